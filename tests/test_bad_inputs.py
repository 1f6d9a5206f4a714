"""Every script, given bad input the way a hostile new user would: each case must end with exit code 2, exactly one
`error:` line on stderr, no traceback, and nothing new left where it would have written.

Most cases run in-process (the script run as `__main__` with its argv: one Python start-up for the whole matrix);
a few run as real subprocesses to check the same end to end. A case that hangs past CASE_SECONDS fails too: an
absurd size must be refused, not worked through."""
import json
import runpy
import shutil
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import HANG_SECONDS, REPO, run_script
from lit_llama.checkpoint import CHECKPOINT_NAME, CONFIG_NAME
from lit_llama.errors import UserError
from lit_llama.files import save_torch
from tiny_runs import finetune_main, make_inputs, settings

CASE_SECONDS = HANG_SECONDS


@dataclass
class World:
    """What the cases start from, made once: a tiny base, a dataset prepared for it, a finished 2-step LoRA run
    (its out_dir and weights), a Hugging Face directory and a GGUF file of the same model."""

    base: Path
    data: Path
    run: Path
    lora: Path
    hf: Path
    gguf: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("world"))


def build_world(root: Path) -> World:
    base, data = make_inputs(root)
    run = root / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finetune_main("lora")(**settings(base, data, run, max_steps=2, eval_interval=100, save_interval=1))
    finally:
        torch.set_num_threads(threads)
    hf = root / "hf"
    run_in_process("scripts/convert_lit_checkpoint.py", ["--checkpoint_path", base, "--output_dir", hf])
    gguf_path = root / "tiny.gguf"
    write_gguf_header(gguf_path)
    return World(base, data, run, run / "lit-llama-lora-finetuned.pth", hf, gguf_path)


def write_gguf_header(path: Path) -> None:
    """A valid GGUF file (metadata and one small tensor): enough to truncate at every point of its header."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


class Hang(Exception):
    pass


def run_in_process(script: str, args: list) -> tuple[int, str]:
    """(exit code, traceback text or "") of `python script args...` run here; stderr goes to capsys."""
    argv = sys.argv
    sys.argv = [str(REPO / script), *map(str, args)]

    def hang(*_):
        raise Hang(f"{script} still running after {CASE_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(CASE_SECONDS)
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
        return 0, ""
    except SystemExit as exit:
        return (exit.code if isinstance(exit.code, int) else 1), ""
    except BaseException:  # what a user would see as a traceback
        return 1, traceback.format_exc()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        sys.argv = argv


# --- the bad files ------------------------------------------------------------------------------------------------


def copy_base(world: World, tmp: Path, name: str = "ckpt") -> Path:
    directory = tmp / name
    shutil.copytree(world.base.parent, directory)
    return directory / CHECKPOINT_NAME


def bad_weights(kind: str) -> Callable[[World, Path], Path]:
    def make(world: World, tmp: Path) -> Path:
        path = copy_base(world, tmp)
        good = path.read_bytes()
        if kind == "bare-tensor":
            torch.save(torch.zeros(3), path)
        elif kind == "list":
            torch.save([torch.zeros(3)], path)
        elif kind == "int":
            torch.save(7, path)
        elif kind == "empty-dict":
            torch.save({}, path)
        elif kind == "dict-of-strings":
            torch.save({"transformer.wte.weight": "zeros"}, path)
        elif kind == "truncated":
            path.write_bytes(good[: len(good) // 2])
        elif kind == "text":
            path.write_text("these are not weights\n")
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "missing":
            path.unlink()
        elif kind == "nested-dict":
            torch.save({"transformer": {"wte": torch.zeros(3)}}, path)
        elif kind == "wrong-dtype-int":
            torch.save({k: torch.zeros(v.shape, dtype=torch.int64) for k, v in torch.load(world.base).items()}, path)
        else:
            raise AssertionError(kind)
        return path

    return make


WEIGHT_KINDS = ["bare-tensor", "list", "int", "empty-dict", "dict-of-strings", "truncated", "text", "empty", "missing",
                "nested-dict", "wrong-dtype-int"]


def bad_model_config(change) -> Callable[[World, Path], Path]:
    """A copy of the base whose model_config.json has `change` applied (a dict of values, or raw text)."""

    def make(world: World, tmp: Path) -> Path:
        path = copy_base(world, tmp)
        config_file = path.parent / CONFIG_NAME
        if isinstance(change, str):
            config_file.write_text(change)
        else:
            config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
        return path

    return make


MODEL_CONFIGS = {
    "n_layer-0": {"n_layer": 0},
    "n_layer-negative": {"n_layer": -1},
    "n_layer-fraction": {"n_layer": 2.5},
    "n_layer-string": {"n_layer": "2"},
    "n_embd-0": {"n_embd": 0},
    "n_head-0": {"n_head": 0},
    "n_head-negative": {"n_head": -4},
    "n_query_groups-0": {"n_query_groups": 0},
    "n_query_groups-not-a-divisor": {"n_query_groups": 3},
    "vocab_size-0": {"vocab_size": 0},
    "vocab_size-negative": {"vocab_size": -5},
    "padded_vocab_size-below-vocab": {"padded_vocab_size": 8},
    "padding_multiple-0": {"padding_multiple": 0, "padded_vocab_size": None},
    "block_size-0": {"block_size": 0},
    "intermediate_size-0": {"intermediate_size": 0},
    "rope_base-0": {"rope_base": 0},
    "rope_scaling-string": {"rope_scaling": "yes"},
    "rope_scaling-missing-keys": {"rope_scaling": {"factor": 8.0}},
    "rope_scaling-list": {"rope_scaling": [1, 2]},
    "rope_scaling-negative-factor": {"rope_scaling": dict(factor=-8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                          original_max_seq_len=8192)},
    "norm_eps-negative": {"norm_eps": -1e-5},
    "tie_embeddings-string": {"tie_embeddings": "yes"},
    "unknown-field": {"n_experts": 8},
    "not-an-object": "[1, 2, 3]",
    "invalid-json": "{\"n_layer\": 2,",
    "norm_eps-nan": None,  # written as a NaN literal below (json.dumps cannot)
}


def nan_norm_eps(world: World, tmp: Path) -> Path:
    path = copy_base(world, tmp)
    config_file = path.parent / CONFIG_NAME
    config_file.write_text(config_file.read_text().replace('"norm_eps": 1e-05', '"norm_eps": NaN'))
    assert "NaN" in config_file.read_text()
    return path


def model_config_maker(kind: str):
    return nan_norm_eps if kind == "norm_eps-nan" else bad_model_config(MODEL_CONFIGS[kind])


def bad_tokenizer(kind: str) -> Callable[[World, Path], Path]:
    def make(world: World, tmp: Path) -> Path:
        path = copy_base(world, tmp)
        directory = path.parent
        if kind == "tokenizer_config-list":
            (directory / "tokenizer_config.json").write_text("[1, 2]")
        elif kind == "tokenizer_config-string":
            (directory / "tokenizer_config.json").write_text('"llama"')
        elif kind == "tokenizer_config-invalid":
            (directory / "tokenizer_config.json").write_text("{")
        elif kind == "tokenizer_json-garbage":
            (directory / "tokenizer.json").write_text("not json at all")
        elif kind == "tokenizer_json-list":
            (directory / "tokenizer.json").write_text("[]")
        elif kind == "no-tokenizer":
            for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
                (directory / name).unlink(missing_ok=True)
        elif kind == "vocabulary-larger-than-model":
            # a model of 64 token rows for a tokenizer of a few hundred: its ids would index past the embedding
            state = torch.load(path)
            state = {k: (v[:64] if k in ("transformer.wte.weight", "lm_head.weight") else v) for k, v in state.items()}
            torch.save(state, path)
            config = json.loads((directory / CONFIG_NAME).read_text())
            (directory / CONFIG_NAME).write_text(json.dumps({**config, "vocab_size": 64, "padded_vocab_size": 64}))
        else:
            raise AssertionError(kind)
        return path

    return make


TOKENIZER_KINDS = ["tokenizer_config-list", "tokenizer_config-string", "tokenizer_config-invalid",
                   "tokenizer_json-garbage", "tokenizer_json-list", "no-tokenizer", "vocabulary-larger-than-model"]


def bad_data(kind: str) -> Callable[[World, Path], Path]:
    def make(world: World, tmp: Path) -> Path:
        directory = tmp / "data"
        shutil.copytree(world.data, directory)
        if kind == "meta-list":
            (directory / "meta.json").write_text("[]")
        elif kind == "meta-invalid":
            (directory / "meta.json").write_text("{")
        elif kind in META_FIELDS:
            meta = json.loads((directory / "meta.json").read_text())
            (directory / "meta.json").write_text(json.dumps({**meta, **META_FIELDS[kind]}))
        elif kind == "meta-missing":
            (directory / "meta.json").unlink()
        elif kind == "train-bare-tensor":
            torch.save(torch.zeros(3), directory / "train.pt")
        elif kind == "train-truncated":
            data = (directory / "train.pt").read_bytes()
            (directory / "train.pt").write_bytes(data[: len(data) // 3])
        elif kind == "train-list-of-ints":
            torch.save([1, 2, 3], directory / "train.pt")
        elif kind == "missing":
            shutil.rmtree(directory)
        elif kind == "test-json-object":
            (directory / "test.json").write_text("{}")
        elif kind == "test-json-nested":
            (directory / "test.json").write_text("[" * 100_000 + "]" * 100_000)
        elif kind == "token-ids-past-vocabulary":
            samples = torch.load(directory / "train.pt")
            train = [{**sample, "input_ids": sample["input_ids"] + 100_000} for sample in samples]
            torch.save(train, directory / "train.pt")
        else:
            raise AssertionError(kind)
        return directory

    return make


META_FIELDS = {"meta-tokenizer-string": {"tokenizer": "gpt2"}, "meta-tokenizer-null": {"tokenizer": None},
               "meta-prompt_style-list": {"prompt_style": ["chatml"]}, "meta-train_size-string": {"train_size": "48"}}
DATA_KINDS = ["meta-list", "meta-invalid", "meta-missing", "train-bare-tensor", "train-truncated", "train-list-of-ints",
              "missing", "token-ids-past-vocabulary", *META_FIELDS]


def short_context(world: World, tmp: Path) -> Path:
    """The base with a context shorter than the prepared samples (the weights do not depend on it)."""
    return bad_model_config({"block_size": 16})(world, tmp)


def records_file(kind: str) -> Callable[[World, Path], Path]:
    def make(world: World, tmp: Path) -> Path:
        good = {"instruction": "Say hi.", "input": "", "output": "hi"}
        path = tmp / "records.json"
        if kind == "nested-json":
            path.write_text("[" * 100_000 + "]" * 100_000)
        elif kind == "nested-record":
            path.write_text('[{"instruction": ' + "[" * 100_000 + "]" * 100_000 + ', "output": "x"}]')
        elif kind == "nested-jsonl":
            path = tmp / "records.jsonl"
            path.write_text(json.dumps(good) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
        elif kind == "top-level-object":
            path.write_text(json.dumps(good))
        elif kind == "list-of-strings":
            path.write_text(json.dumps(["a", "b"]))
        elif kind == "empty-list":
            path.write_text("[]")
        elif kind == "invalid-json":
            path.write_text('[{"instruction": ')
        elif kind == "binary":
            path.write_bytes(b"\x80\x81\xff" * 100)
        elif kind == "unsupported-suffix":
            path = tmp / "records.parquet"
            path.write_bytes(b"PAR1")
        elif kind == "missing-output":
            path.write_text(json.dumps([{"instruction": "Say hi."}] * 20))
        elif kind == "output-not-text":
            path.write_text(json.dumps([{**good, "output": {"a": 1}}] * 20))
        elif kind == "csv-no-rows":
            path = tmp / "records.csv"
            path.write_text("instruction,input,output\n")
        elif kind == "csv-nul":
            path = tmp / "records.csv"
            path.write_text("instruction,input,output\n\0,\0,\0\n")
        elif kind == "record-of-10-MB":
            path.write_text(json.dumps([good] * 20 + [{**good, "output": "word " * 2_000_000}]))
        elif kind == "missing":
            path = tmp / "nowhere.json"
        else:
            raise AssertionError(kind)
        return path

    return make


RECORD_KINDS = ["nested-json", "nested-record", "nested-jsonl", "top-level-object", "list-of-strings", "empty-list",
                "invalid-json", "binary", "unsupported-suffix", "missing-output", "output-not-text", "csv-no-rows",
                "csv-nul", "record-of-10-MB", "missing"]


def chat_file(kind: str) -> Callable[[World, Path], Path]:
    def make(world: World, tmp: Path) -> Path:
        path = tmp / "chat.json"
        turn = {"role": "user", "content": "hi"}
        values = {
            "nested": "[" * 100_000 + "]" * 100_000,
            "messages-not-a-list": json.dumps([{"messages": "hi"}] * 20),
            "unknown-role": json.dumps([{"messages": [{"role": "wizard", "content": "hi"}]}] * 20),
            "empty-conversation": json.dumps([{"messages": []}] * 20),
            "content-not-text": json.dumps([{"messages": [{"role": "user", "content": 5}]}] * 20),
            "top-level-object": json.dumps({"messages": [turn]}),
            "deep-message": json.dumps([{"messages": [{"role": "user", "content": "hi"}]}])[:-3]
            + ', "extra": ' + "[" * 100_000 + "]" * 100_000 + "}]}]",
        }
        path.write_text(values[kind])
        return path

    return make


CHAT_KINDS = ["nested", "messages-not-a-list", "unknown-role", "empty-conversation", "content-not-text",
              "deep-message", "top-level-object"]


def hf_dir(kind: str) -> Callable[[World, Path], Path]:
    def make(world: World, tmp: Path) -> Path:
        directory = tmp / "hf"
        shutil.copytree(world.hf, directory)
        config_file = directory / "config.json"
        config = json.loads(config_file.read_text())
        if kind.startswith("missing-"):
            config.pop(kind.removeprefix("missing-"))
        elif kind == "not-an-object":
            config = [config]
        elif kind == "heads-0":
            config["num_attention_heads"] = 0
        elif kind == "hidden-negative":
            config["hidden_size"] = -64
        elif kind == "layers-string":
            config["num_hidden_layers"] = "two"
        elif kind == "rope_parameters-string":
            config["rope_parameters"] = config["rope_scaling"] = "linear"
        elif kind == "no-config":
            config_file.unlink()
        elif kind == "no-weights":
            for path in directory.glob("*.safetensors"):
                path.unlink()
        elif kind == "invalid-json":
            config_file.write_text("{")
            return directory
        else:
            raise AssertionError(kind)
        if config_file.exists():
            config_file.write_text(json.dumps(config))
        return directory

    return make


HF_KINDS = ["missing-vocab_size", "missing-hidden_size", "missing-num_hidden_layers", "missing-num_attention_heads",
            "missing-intermediate_size", "not-an-object", "heads-0", "hidden-negative", "layers-string",
            "rope_parameters-string", "no-config", "no-weights", "invalid-json"]


def meta_dir(kind: str) -> Callable[[World, Path], Path]:
    def make(world: World, tmp: Path) -> Path:
        directory = tmp / "meta" / "7B"
        directory.mkdir(parents=True)
        save_torch({"tok_embeddings.weight": torch.zeros(320, 64)}, directory / "consolidated.00.pth")
        params = {"dim": 64, "n_layers": 2, "n_heads": 4, "norm_eps": 1e-5, "vocab_size": 320, "multiple_of": 4}
        text = {
            "params-list": "[64, 2, 4]",
            "params-invalid": "{",
            "params-string": '"7B"',
            "dim-missing": json.dumps({k: v for k, v in params.items() if k != "dim"}),
            "dim-0": json.dumps({**params, "dim": 0}),
            "layers-string": json.dumps({**params, "n_layers": "two"}),
        }[kind]
        (directory / "params.json").write_text(text)
        return directory

    return make


META_KINDS = ["params-list", "params-invalid", "params-string", "dim-missing", "dim-0", "layers-string"]


def gguf_file(kind: str) -> Callable[[World, Path], Path]:
    def make(world: World, tmp: Path) -> Path:
        path = tmp / "model.gguf"
        data = world.gguf.read_bytes()
        cut = {"at-2": 2, "at-8": 8, "at-16": 16, "at-24": 24, "at-40": 40, "at-100": 100, "at-200": 200,
               "half": len(data) // 2, "empty": 0}
        if kind == "directory":
            path.mkdir()
        elif kind != "missing":
            path.write_bytes(data[: cut[kind]])
        return path

    return make


def hostile_gguf(kind: str) -> Callable[[World, Path], Path]:
    """A complete two-layer GGUF whose metadata or tensors lie in one way (`kind`)."""

    def make(world: World, tmp: Path) -> Path:
        import gguf
        import numpy as np

        path = tmp / "model.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_block_count(1_000_000 if kind == "million-layers" else 2)
        writer.add_context_length(64)
        writer.add_embedding_length(32)
        writer.add_feed_forward_length(64)
        writer.add_head_count(0 if kind == "head-count-0" else 4)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(["a", "b", "ab"] + [f"t{i}" for i in range(13)])
        writer.add_token_merges(["a zzz"] if kind == "merge-of-unknown-tokens" else ["a b"])
        writer.add_token_types([1] * 16)
        shapes = {"token_embd.weight": (16, 32), "output_norm.weight": (32,)}
        for layer in range(2):
            for name, shape in (("attn_norm", (32,)), ("ffn_norm", (32,)), ("attn_q", (32, 32)), ("attn_k", (32, 32)),
                                ("attn_v", (32, 32)), ("attn_output", (32, 32)), ("ffn_gate", (64, 32)),
                                ("ffn_up", (64, 32)), ("ffn_down", (32, 64))):
                shapes[f"blk.{layer}.{name}.weight"] = shape
        if kind == "shape-not-as-claimed":
            shapes["blk.1.ffn_up.weight"] = (48, 32)
        for name, shape in shapes.items():
            values = np.full(shape, 0.02, dtype=np.float32)
            if kind == "nan-tensor" and name == "blk.1.attn_v.weight":
                values[:] = np.nan
            writer.add_tensor(name, values)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if kind == "huge-array-count":  # the token list claims 2**40 entries
            data = bytearray(path.read_bytes())
            at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 8
            data[at:at + 8] = (2**40).to_bytes(8, "little")
            path.write_bytes(bytes(data))
        return path

    return make


HOSTILE_GGUF_KINDS = ["million-layers", "head-count-0", "merge-of-unknown-tokens", "shape-not-as-claimed",
                      "nan-tensor", "huge-array-count"]
GGUF_KINDS = ["at-2", "at-8", "at-16", "at-24", "at-40", "at-100", "at-200", "half", "empty", "directory", "missing"]


def run_copy(kind: str) -> Callable[[World, Path], Path]:
    """A copy of the finished run with one of its files spoiled, to resume."""

    def make(world: World, tmp: Path) -> Path:
        out_dir = tmp / "run"
        shutil.copytree(world.run, out_dir, ignore=shutil.ignore_patterns(".lock"))
        metrics = out_dir / "logs" / "metrics.csv"
        newest = sorted(out_dir.glob("iter-*-resume.pth"))[-1]
        if kind == "metrics-binary":
            metrics.write_bytes(b"\xff\xfe\x00garbage")
        elif kind == "metrics-step-not-a-number":
            metrics.write_text("step,train_loss\nlast,1.0\n")
        elif kind == "metrics-no-step":
            metrics.write_text("train_loss\n1.0\n")
        elif kind == "metrics-ragged":
            metrics.write_text("step,train_loss\n1,2,3,4\n")
        elif kind == "metrics-nan-step":
            metrics.write_text("step,train_loss\nnan,1.0\n")
        elif kind == "resume-truncated":
            newest.write_bytes(newest.read_bytes()[:100])
        elif kind == "resume-bare-tensor":
            torch.save(torch.zeros(2), newest)
        elif kind == "resume-list":
            torch.save([1, 2], newest)
        elif kind == "finetune-config-list":
            (out_dir / "finetune_config.json").write_text("[]")
        elif kind == "finetune-config-invalid":
            (out_dir / "finetune_config.json").write_text("{")
        else:
            raise AssertionError(kind)
        return out_dir

    return make


RUN_KINDS = ["metrics-binary", "metrics-step-not-a-number", "metrics-no-step", "metrics-ragged", "metrics-nan-step",
             "resume-truncated", "resume-bare-tensor", "resume-list", "finetune-config-list",
             "finetune-config-invalid"]


def finetuned_copy(kind: str) -> Callable[[World, Path], Path]:
    """A copy of the LoRA weights and their finetune_config.json with one of them spoiled."""

    def make(world: World, tmp: Path) -> Path:
        directory = tmp / "lora"
        directory.mkdir()
        path = directory / world.lora.name
        shutil.copy(world.lora, path)
        record = json.loads((world.run / "finetune_config.json").read_text())
        config_file = directory / "finetune_config.json"
        if kind == "config-list":
            config_file.write_text("[]")
            return path
        if kind == "config-missing":
            return path
        if kind == "unknown-method":
            record["method"] = "dora"
        elif kind == "lora-r-0":
            record["lora"]["r"] = 0
        elif kind == "model-config-n_layer-0":
            record["model_config"]["n_layer"] = 0
        elif kind == "base-missing":
            record["base_checkpoint"] = str(tmp / "nowhere" / CHECKPOINT_NAME)
        elif kind == "weights-bare-tensor":
            torch.save(torch.zeros(3), path)
        elif kind == "weights-list":
            torch.save([torch.zeros(3)], path)
        elif kind == "weights-nested":
            record["lora"]["r"] = 4  # shapes that no longer match the weights
        else:
            raise AssertionError(kind)
        config_file.write_text(json.dumps(record))
        return path

    return make


FINETUNED_KINDS = ["config-list", "config-missing", "unknown-method", "lora-r-0", "model-config-n_layer-0",
                   "base-missing", "weights-bare-tensor", "weights-list", "weights-nested"]


# --- the matrix ---------------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    script: str
    args: Callable[[World, Path], list]  # the command line; bad files are made under the case's directory
    subprocess: bool = False


def bad_adapter_dir(tmp: Path) -> Path:
    """A PEFT adapter folder whose adapter_config.json is not JSON."""
    directory = tmp / "adapter"
    directory.mkdir(exist_ok=True)
    (directory / "adapter_config.json").write_text("{r: 8,")
    (directory / "adapter_model.safetensors").write_bytes(b"")
    return directory


def yaml_config(text: str) -> Callable[[World, Path], Path]:
    def make(world: World, tmp: Path) -> Path:
        (tmp / "config.yaml").write_text(text)
        return tmp / "config.yaml"

    return make


def finetune_args(world: World, tmp: Path, *extra, script_out: str = "dest") -> list:
    return ["--checkpoint_path", world.base, "--data_dir", world.data, "--out_dir", tmp / script_out,
            "--train.batch_size", 4, "--train.micro_batch_size", 2, "--train.max_steps", 1,
            "--eval.interval", 100, "--precision", "32-true", *extra]


SAMPLING = {
    "max_new_tokens-0": ["--max_new_tokens", 0], "max_new_tokens-negative": ["--max_new_tokens", -3],
    "prompt-longer-than-context": ["--prompt", "hello " * 2000],
    "top_k-0": ["--top_k", 0], "top_k-negative": ["--top_k", -1],
    "top_p-0": ["--top_p", 0], "top_p-above-1": ["--top_p", 1.5], "top_p-negative": ["--top_p", -0.2],
    "top_p-nan": ["--top_p", "nan"], "temperature-negative": ["--temperature", -0.5],
    "temperature-nan": ["--temperature", "nan"], "temperature-inf": ["--temperature", "inf"],
    "num_samples-0": ["--num_samples", 0], "num_samples-negative": ["--num_samples", -2],
    "precision-unknown": ["--precision", "fp8-magic"], "seed-not-a-number": ["--seed", "abc"],
    "unknown-flag": ["--temprature", 0.5],
}


def cases() -> list[Case]:
    out = []

    def add(id, script, args, subprocess=False):
        out.append(Case(id, script, args, subprocess))

    # generation options, for the base and a finetune
    for name, flags in SAMPLING.items():
        add(f"base-{name}", "generate/base.py", lambda w, t, f=flags: ["--checkpoint_path", w.base, *f])
        add(f"finetuned-{name}", "generate/finetuned.py", lambda w, t, f=flags: ["--finetuned_path", w.lora, *f])
    for script in ("generate/lora.py", "generate/full.py", "generate/adapter.py", "generate/adapter_v2.py"):
        add(f"{script}-top_k-0", script, lambda w, t: ["--finetuned_path", w.lora, "--top_k", 0])
    add("base-empty-prompt-without-bos", "generate/base.py", lambda w, t: ["--checkpoint_path", w.base, "--prompt", ""])
    add("base-quantize-int3", "generate/base.py", lambda w, t: ["--checkpoint_path", w.base, "--quantize", "int3"])
    add("base-config-nan-temperature", "generate/base.py",
        lambda w, t: ["--checkpoint_path", w.base, "--config", yaml_config("temperature: .nan\n")(w, t)])
    add("base-config-inf-top_p", "generate/base.py",
        lambda w, t: ["--checkpoint_path", w.base, "--config", yaml_config("top_p: .inf\n")(w, t)])
    add("base-config-not-a-mapping", "generate/base.py",
        lambda w, t: ["--checkpoint_path", w.base, "--config", yaml_config("- 1\n- 2\n")(w, t)])
    add("finetuned-missing", "generate/finetuned.py", lambda w, t: ["--finetuned_path", t / "nowhere.pth"])
    add("finetuned-is-a-base", "generate/finetuned.py", lambda w, t: ["--finetuned_path", w.base])
    for name in CHAT_KINDS[:-2]:  # one object with "messages" is how a single conversation is given
        add(f"messages-{name}", "generate/finetuned.py",
            lambda w, t, n=name: ["--finetuned_path", w.lora, "--messages", chat_file(n)(w, t)])
    for name in FINETUNED_KINDS:
        add(f"finetuned-{name}", "generate/finetuned.py",
            lambda w, t, n=name: ["--finetuned_path", finetuned_copy(n)(w, t)])

    # checkpoints: weights, model_config.json, tokenizer
    weight_users = {
        "generate/base.py": lambda w, t, p: ["--checkpoint_path", p],
        "scripts/convert_lit_checkpoint.py": lambda w, t, p: ["--checkpoint_path", p, "--output_dir", t / "dest"],
        "scripts/evaluate_tasks.py": lambda w, t, p: ["--checkpoint_path", p, "--data_dir", w.data,
                                                      "--output_json", t / "dest" / "eval.json"],
        "finetune/lora.py": lambda w, t, p: finetune_args(w, t, "--checkpoint_path", p),
        "scripts/merge_lora.py": lambda w, t, p: ["--finetuned_path", w.lora, "--checkpoint_path", p,
                                                  "--output_dir", t / "dest"],
    }
    for name in WEIGHT_KINDS:
        for script, args in weight_users.items():
            add(f"{Path(script).stem}-weights-{name}", script,
                lambda w, t, a=args, n=name: a(w, t, bad_weights(n)(w, t)))
    for name in MODEL_CONFIGS:
        for script in ("generate/base.py", "scripts/convert_lit_checkpoint.py"):
            add(f"{Path(script).stem}-model_config-{name}", script,
                lambda w, t, a=weight_users[script], n=name: a(w, t, model_config_maker(n)(w, t)))
    for name in ("n_layer-0", "rope_scaling-string", "norm_eps-negative", "not-an-object"):
        add(f"full-model_config-{name}", "finetune/full.py",
            lambda w, t, n=name: finetune_args(w, t, "--checkpoint_path", model_config_maker(n)(w, t)))
    for name in TOKENIZER_KINDS:
        for script in ("generate/base.py", "finetune/lora.py", "scripts/evaluate_tasks.py"):
            add(f"{Path(script).stem}-{name}", script,
                lambda w, t, a=weight_users[script], n=name: a(w, t, bad_tokenizer(n)(w, t)))
        add(f"prepare_json-{name}", "scripts/prepare_json.py",
            lambda w, t, n=name: ["--data_file", records_file("missing-output")(w, t), "--checkpoint_dir",
                                  bad_tokenizer(n)(w, t).parent, "--destination_path", t / "dest"])

    # prepared data
    for name in DATA_KINDS:
        add(f"lora-data-{name}", "finetune/lora.py",
            lambda w, t, n=name: finetune_args(w, t, "--data_dir", bad_data(n)(w, t)))
    for name in ("meta-list", "meta-invalid", "missing", "test-json-object", "test-json-nested"):
        add(f"evaluate-data-{name}", "scripts/evaluate_tasks.py",
            lambda w, t, n=name: ["--checkpoint_path", w.base, "--data_dir", bad_data(n)(w, t),
                                  "--output_json", t / "dest" / "eval.json"])
    add("adapter-data-meta-list", "finetune/adapter.py",
        lambda w, t: finetune_args(w, t, "--data_dir", bad_data("meta-list")(w, t)))
    add("lora-samples-longer-than-context", "finetune/lora.py",
        lambda w, t: finetune_args(w, t, "--checkpoint_path", short_context(w, t)))

    # settings of a finetune, as flags and through --config
    bad_settings = {
        "learning_rate-negative": ["--train.learning_rate", -1], "learning_rate-nan": ["--train.learning_rate", "nan"],
        "weight_decay-negative": ["--train.weight_decay", -0.1], "batch_size-0": ["--train.batch_size", 0],
        "micro_batch_size-0": ["--train.micro_batch_size", 0], "batch-not-a-multiple": ["--train.batch_size", 5],
        "epochs-0": ["--train.epochs", 0], "max_steps-0": ["--train.max_steps", 0],
        "warmup-negative": ["--train.warmup_steps", -1], "save_interval-0": ["--train.save_interval", 0],
        "log_interval-0": ["--train.log_interval", 0], "eval-interval-0": ["--eval.interval", 0],
        "eval-iters-0": ["--eval.iters", 0], "devices-0": ["--devices", 0], "devices-negative": ["--devices", -1],
        "num_nodes-0": ["--num_nodes", 0], "precision-unknown": ["--precision", "fp3"],
        "quantize-unknown": ["--quantize", "int3"], "lora-r-0": ["--lora.r", 0],
        "lora-alpha-nan": ["--lora.alpha", "nan"],
        "lora-dropout-above-1": ["--lora.dropout", 1.5], "lora-dropout-negative": ["--lora.dropout", -0.1],
        "lora-targets-unknown": ["--lora.targets", "[query,bogus]"], "lora-targets-empty": ["--lora.targets", "[]"],
        "resume-missing-path": ["--resume", "nowhere/iter-000001-resume.pth"],
        "unknown-flag": ["--train.learnin_rate", 1e-3],
    }
    for name, flags in bad_settings.items():
        add(f"lora-{name}", "finetune/lora.py", lambda w, t, f=flags: finetune_args(w, t, *f))
    yaml_settings = {
        "learning_rate-nan": "train:\n  learning_rate: .nan\n", "learning_rate-inf": "train:\n  learning_rate: .inf\n",
        "weight_decay-nan": "train:\n  weight_decay: .nan\n", "weight_decay-inf": "train:\n  weight_decay: .inf\n",
        "lora-alpha-inf": "lora:\n  alpha: .inf\n", "lora-dropout-nan": "lora:\n  dropout: .nan\n",
        "not-yaml": "train: [unclosed\n",
    }
    for name, text in yaml_settings.items():
        add(f"lora-config-{name}", "finetune/lora.py",
            lambda w, t, x=text: finetune_args(w, t, "--config", yaml_config(x)(w, t)))
    for name, flags in {"prompt_length-0": ["--adapter.prompt_length", 0],
                        "start_layer-past-the-model": ["--adapter.start_layer", 99],
                        "start_layer-negative": ["--adapter.start_layer", -1]}.items():
        add(f"adapter-{name}", "finetune/adapter.py", lambda w, t, f=flags: finetune_args(w, t, *f))
        add(f"adapter_v2-{name}", "finetune/adapter_v2.py", lambda w, t, f=flags: finetune_args(w, t, *f))
    add("full-quantize", "finetune/full.py", lambda w, t: finetune_args(w, t, "--quantize", "nf4"))
    add("full-weight_decay-negative", "finetune/full.py", lambda w, t: finetune_args(w, t, "--train.weight_decay", -1))
    for name in RUN_KINDS:
        add(f"resume-{name}", "finetune/lora.py",
            lambda w, t, n=name: finetune_args(w, t, "--out_dir", run_copy(n)(w, t), "--resume", "auto",
                                               "--train.max_steps", 3, "--train.batch_size", 8, "--eval.interval", 3))

    # records to prepare
    def prepare_args(w, t, data_file, *extra):
        return ["--data_file", data_file, "--checkpoint_dir", w.base.parent, "--destination_path", t / "dest",
                "--test_split_size", 2, *extra]

    for name in RECORD_KINDS:
        add(f"prepare_json-{name}", "scripts/prepare_json.py",
            lambda w, t, n=name: prepare_args(w, t, records_file(n)(w, t)))
    for script in ("scripts/prepare_alpaca.py", "scripts/prepare_dolly.py"):
        for name in ("nested-json", "binary", "record-of-10-MB", "top-level-object"):
            add(f"{Path(script).stem}-{name}", script, lambda w, t, n=name: prepare_args(w, t, records_file(n)(w, t)))
    for name in CHAT_KINDS:
        add(f"prepare_chat-{name}", "scripts/prepare_chat.py",
            lambda w, t, n=name: prepare_args(w, t, chat_file(n)(w, t)))
    prepare_options = {
        "test_split-negative": ["--test_split_size", -1], "test_split-all": ["--test_split_size", 10_000],
        "max_seq_length-0": ["--max_seq_length", 0], "max_seq_length-negative": ["--max_seq_length", -5],
        "prompt_style-unknown": ["--prompt_style", "klingon"],
        "tokenizer_path-missing": ["--tokenizer_path", "nowhere.model"],
        "instruction_field-absent": ["--instruction_field", "question"],
    }
    good_records = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(20)]

    def good_file(w, t):
        (t / "good.json").write_text(json.dumps(good_records))
        return t / "good.json"

    for name, flags in prepare_options.items():
        add(f"prepare_json-{name}", "scripts/prepare_json.py",
            lambda w, t, f=flags: prepare_args(w, t, good_file(w, t), *f))
    builtin_options = {
        "num_records-huge": ["--num_records", 100_000_000], "num_records-absurd": ["--num_records", 10**15],
        "num_records-0": ["--num_records", 0], "num_records-negative": ["--num_records", -1],
        "test_split-all": ["--num_records", 50, "--test_split_size", 50],
        "test_split-negative": ["--test_split_size", -3],
        "max_seq_length-0": ["--max_seq_length", 0], "prompt_style-unknown": ["--prompt_style", "klingon"],
        "checkpoint_dir-missing": ["--checkpoint_dir", "nowhere"],
    }
    for name, flags in builtin_options.items():
        add(f"prepare_builtin-{name}", "scripts/prepare_builtin.py",
            lambda w, t, f=flags: ["--checkpoint_dir", w.base.parent, "--destination_path", t / "dest",
                                   "--test_split_size", 10, *f])

    # where results go
    empty_destinations = {
        "scripts/prepare_json.py": lambda w, t: ["--data_file", good_file(w, t), "--checkpoint_dir", w.base.parent,
                                                 "--destination_path", ""],
        "scripts/prepare_chat.py": lambda w, t: ["--data_file", chat_file("unknown-role")(w, t), "--checkpoint_dir",
                                                 w.base.parent, "--destination_path", ""],
        "scripts/prepare_alpaca.py": lambda w, t: ["--data_file", good_file(w, t), "--checkpoint_dir", w.base.parent,
                                                   "--destination_path", ""],
        "scripts/prepare_dolly.py": lambda w, t: ["--data_file", good_file(w, t), "--checkpoint_dir", w.base.parent,
                                                  "--destination_path", ""],
        "scripts/prepare_builtin.py": lambda w, t: ["--checkpoint_dir", w.base.parent, "--num_records", 50,
                                                    "--test_split_size", 10, "--destination_path", ""],
        "scripts/convert_lit_checkpoint.py": lambda w, t: ["--checkpoint_path", w.base, "--output_dir", ""],
        "scripts/convert_hf_checkpoint.py": lambda w, t: ["--checkpoint_dir", w.hf, "--output_dir", ""],
        "scripts/convert_gguf_checkpoint.py": lambda w, t: ["--gguf_path", w.gguf, "--output_dir", ""],
        "scripts/merge_lora.py": lambda w, t: ["--finetuned_path", w.lora, "--output_dir", ""],
        "scripts/convert_lora_to_peft.py": lambda w, t: ["--finetuned_path", w.lora, "--output_dir", ""],
        "finetune/lora.py": lambda w, t: finetune_args(w, t, "--out_dir", ""),
        "scripts/evaluate_tasks.py": lambda w, t: ["--checkpoint_path", w.base, "--data_dir", w.data,
                                                   "--output_json", ""],
    }
    for script, args in empty_destinations.items():
        add(f"{Path(script).stem}-empty-destination", script, args)

    def a_file(t):
        (t / "dest").write_text("I am a file")
        return t / "dest"

    add("prepare_json-destination-is-a-file", "scripts/prepare_json.py",
        lambda w, t: ["--data_file", good_file(w, t), "--checkpoint_dir", w.base.parent,
                      "--destination_path", a_file(t), "--test_split_size", 2])
    add("convert_lit-output-is-a-file", "scripts/convert_lit_checkpoint.py",
        lambda w, t: ["--checkpoint_path", w.base, "--output_dir", a_file(t)])
    add("merge_lora-output-is-a-file", "scripts/merge_lora.py",
        lambda w, t: ["--finetuned_path", w.lora, "--output_dir", a_file(t)])
    add("lora-out_dir-is-a-file", "finetune/lora.py", lambda w, t: finetune_args(w, t, "--out_dir", a_file(t)))
    add("evaluate-output_json-is-a-directory", "scripts/evaluate_tasks.py",
        lambda w, t: ["--checkpoint_path", w.base, "--data_dir", w.data,
                      "--output_json", (t / "dest").mkdir() or t / "dest"])
    add("evaluate-output_json-under-a-file", "scripts/evaluate_tasks.py",
        lambda w, t: ["--checkpoint_path", w.base, "--data_dir", w.data, "--output_json", a_file(t) / "eval.json"])

    # evaluation settings
    for name, flags in {"batch_size-0": ["--batch_size", 0], "batch_size-negative": ["--batch_size", -1],
                        "max_new_tokens-0": ["--max_new_tokens", 0], "max_records-0": ["--max_records", 0],
                        "max_records-negative": ["--max_records", -3], "precision-unknown": ["--precision", "fp3"],
                        "prompt_style-unknown": ["--prompt_style", "klingon"],
                        "data_file-missing": ["--data_file", "nowhere.json"],
                        "finetuned_path-missing": ["--finetuned_path", "nowhere.pth"]}.items():
        add(f"evaluate-{name}", "scripts/evaluate_tasks.py",
            lambda w, t, f=flags: ["--checkpoint_path", w.base, "--data_dir", w.data,
                                   "--output_json", t / "dest" / "eval.json", *f])
    add("evaluate-data_file-nested", "scripts/evaluate_tasks.py",
        lambda w, t: ["--checkpoint_path", w.base, "--data_file", records_file("nested-json")(w, t),
                      "--output_json", t / "dest" / "eval.json"])

    # converters
    for name in HF_KINDS:
        add(f"convert_hf-{name}", "scripts/convert_hf_checkpoint.py",
            lambda w, t, n=name: ["--checkpoint_dir", hf_dir(n)(w, t), "--output_dir", t / "dest"])
    add("convert_hf-dtype-unknown", "scripts/convert_hf_checkpoint.py",
        lambda w, t: ["--checkpoint_dir", w.hf, "--output_dir", t / "dest", "--dtype", "float7"])
    for name in META_KINDS:
        add(f"convert_meta-{name}", "scripts/convert_checkpoint.py",
            lambda w, t, n=name: ["--checkpoint_dir", meta_dir(n)(w, t), "--output_dir", t / "dest"])
    for name in GGUF_KINDS:
        add(f"convert_gguf-truncated-{name}", "scripts/convert_gguf_checkpoint.py",
            lambda w, t, n=name: ["--gguf_path", gguf_file(n)(w, t), "--output_dir", t / "dest"])
    for name in HOSTILE_GGUF_KINDS:
        add(f"convert_gguf-{name}", "scripts/convert_gguf_checkpoint.py",
            lambda w, t, n=name: ["--gguf_path", hostile_gguf(n)(w, t), "--output_dir", t / "dest"])
    for name in ("config-list", "weights-bare-tensor", "unknown-method", "lora-r-0"):
        add(f"merge_lora-finetuned-{name}", "scripts/merge_lora.py",
            lambda w, t, n=name: ["--finetuned_path", finetuned_copy(n)(w, t), "--checkpoint_path", w.base,
                                  "--output_dir", t / "dest"])
        add(f"peft-finetuned-{name}", "scripts/convert_lora_to_peft.py",
            lambda w, t, n=name: ["--finetuned_path", finetuned_copy(n)(w, t), "--checkpoint_path", w.base,
                                  "--output_dir", t / "dest"])

    # chat, serving, GGUF export, PEFT import, the harness: refused before they start a session, a server or a write
    for name, flags in {"checkpoint-missing": ["--checkpoint_path", "nowhere/lit-llama.pth"],
                        "finetuned-missing": ["--finetuned_path", "nowhere.pth"],
                        "max_new_tokens-0": ["--max_new_tokens", 0], "temperature-negative": ["--temperature", -1],
                        "top_p-0": ["--top_p", 0], "context_length-0": ["--context_length", 0],
                        "precision-unknown": ["--precision", "fp8-magic"]}.items():
        base = [] if "checkpoint" in name or "finetuned" in name else ["--checkpoint_path", "BASE"]
        add(f"chat-{name}", "generate/chat.py",
            lambda w, t, f=flags, b=base: [w.base if x == "BASE" else x for x in b] + f)
    for name, flags in {"checkpoint-missing": ["--checkpoint_path", "nowhere/lit-llama.pth"],
                        "lora-without-name": ["--lora", "[just-a-path]"],
                        "lora-missing": ["--lora", "[mine=nowhere.pth]"], "max_batch_size-0": ["--max_batch_size", 0],
                        "context_length-0": ["--context_length", 0], "port-negative": ["--port", -5]}.items():
        base = [] if name == "checkpoint-missing" else ["--checkpoint_path", "BASE"]
        add(f"serve-{name}", "scripts/serve.py",
            lambda w, t, f=flags, b=base: [w.base if x == "BASE" else x for x in b] + f)
    for name, flags in {"checkpoint-missing": ["--checkpoint_path", "nowhere/lit-llama.pth"],
                        "outtype-unknown": ["--checkpoint_path", "BASE", "--outtype", "q3_x"],
                        "outtype-k-quant": ["--checkpoint_path", "BASE", "--outtype", "q4_k"],
                        "finetuned-missing": ["--finetuned_path", "nowhere.pth"]}.items():
        add(f"to_gguf-{name}", "scripts/convert_to_gguf.py",
            lambda w, t, f=flags: [w.base if x == "BASE" else x for x in f] + ["--output_path", t / "dest" / "m.gguf"])
    add("peft_to_lora-adapter-missing", "scripts/convert_peft_to_lora.py",
        lambda w, t: ["--adapter_dir", t / "nowhere", "--checkpoint_path", w.base, "--output_dir", t / "dest"])
    add("peft_to_lora-config-not-json", "scripts/convert_peft_to_lora.py",
        lambda w, t: ["--adapter_dir", bad_adapter_dir(t), "--checkpoint_path", w.base, "--output_dir", t / "dest"])
    for name, flags in {"checkpoint-missing": ["--checkpoint_path", "nowhere/lit-llama.pth"],
                        "include_path-missing": ["--include_path", "nowhere", "--checkpoint_path", "BASE"],
                        "batch_size-0": ["--batch_size", 0, "--checkpoint_path", "BASE"]}.items():
        add(f"harness-{name}", "scripts/evaluate_harness.py",
            lambda w, t, f=flags: ["--tasks", "mine"] + [w.base if x == "BASE" else x for x in f]
            + ["--output_json", t / "dest" / "eval.json"])

    # quickstart: its own settings are checked before it starts any step
    for name, flags in {"num_records-0": ["--num_records", 0], "batch_size-0": ["--batch_size", 0],
                        "lora_r-0": ["--lora_r", 0], "learning_rate-nan": ["--learning_rate", "nan"],
                        "eval_records-negative": ["--eval_records", -1]}.items():
        add(f"quickstart-{name}", "scripts/quickstart.py",
            lambda w, t, f=flags: ["--checkpoint_dir", w.base.parent, "--data_dir", t / "dest" / "data",
                                   "--out_dir", t / "dest" / "out", *f])

    # a few end to end, as real processes
    for id in ("base-top_k-0", "base-weights-list", "convert_gguf-truncated-at-24", "prepare_json-nested-json",
               "lora-config-learning_rate-nan", "convert_hf-missing-hidden_size"):
        case = next(c for c in out if c.id == id)
        out.append(Case(f"{id}-subprocess", case.script, case.args, subprocess=True))
    return out


CASES = cases()


def snapshot(directory: Path) -> set:
    return {path.relative_to(directory) for path in directory.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_one_error_line_and_leaves_nothing(case, world, tmp_path, monkeypatch, capsys):
    work = tmp_path / "cwd"  # relative defaults (data/alpaca, out/...) land here and are counted
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = case.args(world, tmp_path)
    before = snapshot(tmp_path)
    if case.subprocess:
        result = run_script(case.script, *args)
        code, stderr, trace = result.returncode, result.stderr, ""
    else:
        capsys.readouterr()
        code, trace = run_in_process(case.script, args)
        stderr = capsys.readouterr().err
    assert not trace and "Traceback" not in stderr, f"TRACEBACK\n{trace or stderr}"
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2, f"EXIT {code}\n{stderr[-2000:]}"
    assert len(errors) == 1, f"ERROR LINES {len(errors)}\n{stderr[-2000:]}"
    left = sorted(str(p) for p in snapshot(tmp_path) - before if p.name != ".lock")
    assert not left, f"LEFT FILES {left}"


def test_the_matrix_covers_every_script_with_enough_cases():
    scripts = {str(p.relative_to(REPO)) for d in ("scripts", "finetune", "generate") for p in (REPO / d).glob("*.py")}
    assert scripts <= {case.script for case in CASES}
    assert len({case.id for case in CASES}) == len(CASES) >= 150


# --- the Python API ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [dict(n_layer=0), dict(n_embd=-64), dict(vocab_size=0), dict(norm_eps=-1.0),
                                    dict(rope_scaling="yes"), dict(n_layer=2.5), dict(block_size=0)])
def test_config_refuses_bad_sizes_in_one_line(values):
    from lit_llama import Config

    with pytest.raises(ValueError) as error:
        Config.from_name("tiny", **values)
    assert "\n" not in str(error.value) and next(iter(values)) in str(error.value)


def test_load_refuses_a_bad_checkpoint_with_a_user_error(world, tmp_path):
    import lit_llama

    for make in (bad_weights("list"), model_config_maker("n_layer-0"), bad_tokenizer("vocabulary-larger-than-model")):
        target = tmp_path / make.__qualname__
        target.mkdir(exist_ok=True)
        with pytest.raises(UserError):
            lit_llama.load(make(world, target))


@pytest.mark.parametrize("options", [dict(max_new_tokens=0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
                                     dict(temperature=-1.0), dict(temperature=float("nan"))])
def test_generate_refuses_bad_options(world, options):
    import lit_llama

    model, tokenizer = lit_llama.load(world.base)
    with pytest.raises((UserError, ValueError)):
        list(lit_llama.generate(model, tokenizer.encode("hi"), **{"max_new_tokens": 3, **options}))


# --- messages that must not mislead -------------------------------------------------------------------------------


def test_a_legacy_non_zip_checkpoint_loads_instead_of_being_called_corrupt(tmp_path):
    from lit_llama.files import load_torch

    state = {"transformer.wte.weight": torch.randn(4, 8)}
    torch.save(state, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    assert torch.equal(load_torch(tmp_path / "legacy.bin")["transformer.wte.weight"], state["transformer.wte.weight"])
    (tmp_path / "cut.bin").write_bytes((tmp_path / "legacy.bin").read_bytes()[:60])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_torch(tmp_path / "cut.bin")


def test_a_lora_on_another_base_of_the_same_shapes_is_warned_about(world, tmp_path, capsys):
    from lit_llama.finetuned import load_finetuned
    from tiny_finetunes import make_base

    record = json.loads((world.run / "finetune_config.json").read_text())
    assert len(record["base_fingerprint"]) == 16
    load_finetuned(world.lora)
    assert "warning" not in capsys.readouterr().err
    other = make_base(tmp_path / "other", seed=1)  # same config and tokenizer, other weights
    load_finetuned(world.lora, other)
    warning = capsys.readouterr().err
    assert f"warning: {other} is not the base" in warning and record["base_fingerprint"] in warning
    bf16 = copy_base(world, tmp_path, "bf16")  # the same base stored in bf16 is the same base
    torch.save({k: v.to(torch.bfloat16) for k, v in torch.load(bf16).items()}, bf16)
    load_finetuned(world.lora, bf16)
    assert "warning" not in capsys.readouterr().err
