"""The OpenAI-compatible HTTP API (FastAPI): /v1/chat/completions, /v1/completions, /v1/models, and /health.

A request is checked here (its model, its length against the context, its fields), tokenized (chat messages with
the model's chat template: the base checkpoint's, or the prompt style an adapter was finetuned with) and handed to
the engine thread (engine.py); its tokens come back through an asyncio queue, as one JSON reply or as server-sent
events. Every error has OpenAI's shape, {"error": {"message", "type", "param", "code"}}, never plain text or a
traceback: 400 for a request the server cannot serve (too long for the context, body not JSON, text that is not
Unicode, an OpenAI option it does not implement), 404 for an unknown model or path, 413 for a body over the limit,
422 for a body with wrong fields. Tokenizing runs off the event loop, after a length bound that refuses a huge
prompt without tokenizing it, so one large request never stalls the others.
A streaming client that disconnects cancels its request: the engine frees its slot at the next step.
"""
import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from lit_llama.errors import UserError
from lit_llama.prompts import PromptStyle
from lit_llama.serving.engine import Engine, Event, Request, TokenLogprob


@dataclass
class ServedModel:
    name: str
    adapter: int  # 0: the base
    style: Optional[PromptStyle]  # how its chat messages are rendered (None: no chat template)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class ASCIIJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a reply can always be encoded, whatever a client sent."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, param=None, code=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return ASCIIJSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def unicode_text(value: str) -> str:
    """JSON can spell a lone surrogate (\\ud800), which is not text: no tokenizer or reply could encode it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("lone_surrogate", "holds a lone surrogate (\\ud800-\\udfff), which is not text") from None
    return value


Text = Annotated[str, AfterValidator(unicode_text)]
# OpenAI options this server does not implement, with the values that ask for nothing: any other value is refused
# with a 400 naming the field rather than ignored (a client would otherwise trust an answer it did not get)
UNSUPPORTED = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "logit_bias": (None, {}), "best_of": (None, 1),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "suffix": (None, ""), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,),
}


UNION_BRANCHES = {"str", "int", "float", "bool", "dict", "list"}


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, metadata, ...)

    model: Text
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Optional[Union[Text, list[Text]]] = Field(None, max_length=4)
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**63)  # OpenAI's int64
    stream: bool = False
    stream_options: Optional[dict] = None
    n: int = Field(1, ge=1, le=1)  # one choice per request

    def refuse_unsupported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                raise APIError(400, f"{name} is not supported by this server", name, "unsupported_parameter")


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[Text, list[TextPart]]

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)

    def top_logprobs_asked(self) -> Optional[int]:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampling):
    prompt: Union[Text, list[Text]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)  # the legacy API's: how many alternatives per token


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 as soon as its size is known (its
    Content-Length, or the bytes received so far), without being kept or parsed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await self.refuse(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # a body sent without a true Content-Length
                raise BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge:
            await self.refuse(scope, receive, send)

    async def refuse(self, scope, receive, send):
        # the rest of the body is read and dropped first: a client still sending when the reply comes would see a
        # broken connection instead of the error
        message = {"more_body": True}
        while message.get("more_body") and message.get("type") != "http.disconnect":
            message = await receive()
        response = error_response(413, f"the request body is larger than this server's limit of {self.max_bytes:,} "
                                       "bytes", code="request_too_large")
        await response(scope, receive, send)


class BodyTooLarge(Exception):
    pass


def create_app(engine: Engine, tokenizer, models: dict[str, ServedModel], default_max_tokens: int,
               max_request_bytes: int = 1 << 20) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="lit-llama", lifespan=lifespan, default_response_class=ASCIIJSONResponse)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return error_response(error.status, error.message, error.param, error.code)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):  # unknown paths, wrong methods
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def internal_error(request, error: Exception):  # the traceback goes to the server's log, not the client
        return error_response(500, f"the server failed on this request ({type(error).__name__})")

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, error: RequestValidationError):
        problems = error.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        first = problems[0] if problems else {}
        # the field's path, without the names pydantic gives the branches of a union ("str", "list[TextPart]")
        parts = [str(part) for part in first.get("loc", ())[1:]]
        where = ".".join(part for part in parts if "[" not in part and part not in UNION_BRANCHES) or None
        status = 400 if first.get("type") == "lone_surrogate" else 422
        return error_response(status, f"invalid request: {where}: {first.get('msg', 'invalid value')}", param=where)

    @app.get("/v1/models")
    async def list_models():
        data = [{"id": name, "object": "model", "created": created, "owned_by": "lit-llama"} for name in models]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        return engine.status()

    def served(name: str) -> ServedModel:
        if name not in models:
            raise APIError(404, f"the model {name!r} does not exist; served: {', '.join(models)}", "model",
                           "model_not_found")
        return models[name]

    async def tokenized(encode, texts: list[str], param: str) -> Any:
        """`encode()` in a worker thread, once the texts' length cannot already prove the prompt too long."""
        characters = sum(map(len, texts))
        if characters > engine.context_length * tokenizer.max_token_chars:
            raise APIError(400, f"this model's context is {engine.context_length} tokens; the prompt's {characters:,} "
                                "characters are surely more", param, "context_length_exceeded")
        return await run_in_threadpool(encode)

    def submit(body: Sampling, model: ServedModel, prompt: list[int], max_tokens: Optional[int], param: str,
               top_logprobs: Optional[int]):
        limit = engine.context_length
        if not prompt:
            raise APIError(400, "the prompt is empty", param)
        if len(prompt) >= limit or (max_tokens is not None and len(prompt) + max_tokens > limit):
            asked = f" plus max_tokens {max_tokens}" if max_tokens else ""
            raise APIError(400, f"this model's context is {limit} tokens; the prompt has {len(prompt)}{asked}",
                           param, "context_length_exceeded")
        max_tokens = max_tokens or min(default_max_tokens, limit - len(prompt))
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(s for s in body.stop or () if s)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed (server shutdown)
                pass

        request = Request(prompt, model.adapter, max_tokens, emit, body.temperature, body.top_p, stop, body.seed,
                          top_logprobs)
        engine.submit(request)
        return request, events

    async def collect(request: Request, events: asyncio.Queue) -> tuple[str, Event, list[TokenLogprob]]:
        text, logprobs = [], []
        try:
            while True:
                event = await events.get()
                if event.error:
                    raise APIError(500, event.error)
                text.append(event.text)
                logprobs += event.logprobs
                if event.finish_reason:
                    return "".join(text), event, logprobs
        finally:
            request.cancelled = True  # a no-op once it finished; frees the slot if this handler was cancelled

    def token_text(token: int) -> str:
        return tokenizer.decode([token])

    def chat_logprobs(entries: list[TokenLogprob]) -> dict:
        """OpenAI's chat form: each token with its log-probability, its UTF-8 bytes and the most likely tokens."""

        def described(token: int, logprob: float) -> dict:
            text = token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [described(e.token, e.logprob) | {"top_logprobs": [described(*t) for t in e.top]}
                            for e in entries], "refusal": None}

    def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict:
        """The legacy completions form: parallel lists, each token's character offset in the returned text."""
        tokens = [token_text(e.token) for e in entries]
        offsets = [offset + sum(map(len, tokens[:i])) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{token_text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}

    def usage(event: Event) -> dict:
        return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens}

    def stream(request: Request, events: asyncio.Queue, chunk, include_usage: bool):
        """Server-sent events: `chunk(text, finish_reason)` for each piece, usage if asked, then [DONE]."""

        async def body():
            try:
                first = chunk(None, None)
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                while True:
                    event = await events.get()
                    if event.error:
                        yield f"data: {json.dumps({'error': {'message': event.error, 'type': 'server_error'}})}\n\n"
                        break
                    if event.text or event.finish_reason:
                        yield f"data: {json.dumps(chunk(event.text, event.finish_reason, event.logprobs))}\n\n"
                    if event.finish_reason:
                        if include_usage:
                            final = chunk("", None) | {"choices": [], "usage": usage(event)}
                            yield f"data: {json.dumps(final)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                request.cancelled = True  # the client went away mid-stream (or the reply is complete)

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        body.refuse_unsupported()
        model = served(body.model)
        if model.style is None or model.style.chat_template is None:
            raise APIError(400, f"model {model.name!r} has no chat template to render messages with: use "
                                "/v1/completions", "messages")
        messages = [m.as_dict() for m in body.messages]
        try:
            prompt = await tokenized(lambda: model.style.conversation_ids(tokenizer, messages).tolist(),
                                     [m["content"] for m in messages], "messages")
        except UserError as error:
            raise APIError(400, str(error), "messages") from None
        top_logprobs = body.top_logprobs_asked()
        request, events = submit(body, model, prompt, body.max_completion_tokens or body.max_tokens, "messages",
                                 top_logprobs)
        reply_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            def chunk(text, finish_reason, logprobs=()):
                delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
                if finish_reason and not text:
                    delta = {}
                shown = chat_logprobs(logprobs) if top_logprobs is not None and logprobs else None
                return {"id": reply_id, "object": "chat.completion.chunk", "created": now, "model": model.name,
                        "choices": [{"index": 0, "delta": delta, "logprobs": shown, "finish_reason": finish_reason}]}

            return stream(request, events, chunk, bool((body.stream_options or {}).get("include_usage")))
        text, final, logprobs = await collect(request, events)
        return {"id": reply_id, "object": "chat.completion", "created": now, "model": model.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": chat_logprobs(logprobs) if top_logprobs is not None else None,
                             "finish_reason": final.finish_reason}],
                "usage": usage(final)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        body.refuse_unsupported()
        model = served(body.model)
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise APIError(400, "one prompt per request (a list of one string at most)", "prompt")
            body.prompt = body.prompt[0]
        prompt = await tokenized(lambda: tokenizer.encode(body.prompt).tolist(), [body.prompt], "prompt")
        request, events = submit(body, model, prompt, body.max_tokens, "prompt", body.logprobs)
        reply_id, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prefix = body.prompt if body.echo else ""
        if body.stream:
            sent = len(prefix)

            def chunk(text, finish_reason, logprobs=()):
                nonlocal sent
                if text is None:
                    if not prefix:
                        return None
                    text = prefix
                    shown = None
                else:
                    shown = completion_logprobs(logprobs, sent) if body.logprobs is not None else None
                    sent += len(text)
                return {"id": reply_id, "object": "text_completion", "created": now, "model": model.name,
                        "choices": [{"index": 0, "text": text, "logprobs": shown, "finish_reason": finish_reason}]}

            return stream(request, events, chunk, bool((body.stream_options or {}).get("include_usage")))
        text, final, logprobs = await collect(request, events)
        shown = completion_logprobs(logprobs, len(prefix)) if body.logprobs is not None else None
        return {"id": reply_id, "object": "text_completion", "created": now, "model": model.name,
                "choices": [{"index": 0, "text": prefix + text, "logprobs": shown, "finish_reason": final.finish_reason}],
                "usage": usage(final)}

    return app
