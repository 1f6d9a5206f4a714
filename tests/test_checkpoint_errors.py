"""Bad checkpoints must give one clear `error:` line and exit code 2: no traceback, nothing half-written, and a
pickle carrying code must be refused without running it."""
import json
import os

import pytest
import torch

from conftest import run_script
from lit_llama.checkpoint import save_config
from lit_llama.model import LLaMA, Config

SCRIPTS = {
    "scripts/convert_lit_checkpoint.py": lambda path, tmp: ["--checkpoint_path", path, "--output_dir", tmp / "hf"],
    "generate/base.py": lambda path, tmp: ["--checkpoint_path", path, "--max_new_tokens", "1"],
}


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tiny_checkpoint(directory):
    directory.mkdir(parents=True, exist_ok=True)
    config = Config.from_name("tiny")
    torch.save(LLaMA(config).state_dict(), directory / "lit-llama.pth")
    save_config(config, directory)
    return directory / "lit-llama.pth"


def bad_checkpoint(kind: str, tmp_path):
    if kind == "missing":
        return tmp_path / "nowhere" / "lit-llama.pth", "not found"
    path = tiny_checkpoint(tmp_path / "ckpt")
    if kind == "wrong-shapes":
        config = json.loads((path.parent / "model_config.json").read_text())
        (path.parent / "model_config.json").write_text(json.dumps({**config, "n_embd": 128}))
        return path, "shape"
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, "truncated or corrupt"
    if kind == "random-bytes":  # damage, which must not be reported as a hostile pickle
        path.write_bytes(b"\x80\x02" + bytes((i * 37) % 256 for i in range(10_000)))
        return path, "truncated or corrupt"
    if kind == "code-in-pickle":
        torch.save({"transformer.wte.weight": RunsCode(tmp_path / "pwned")}, path)
        return path, "refusing"
    raise AssertionError(kind)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("kind", ["missing", "wrong-shapes", "truncated", "random-bytes", "code-in-pickle"])
def test_bad_checkpoint_gives_one_line_error(tmp_path, script, kind):
    path, expected = bad_checkpoint(kind, tmp_path)
    result = run_script(script, *SCRIPTS[script](path, tmp_path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0] and str(path.name) in errors[0], result.stderr
    assert not (tmp_path / "pwned").exists()  # the pickled os.system call never ran
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


def test_the_code_in_pickle_payload_is_real(tmp_path):
    """Guards the test above: loaded unsafely, the same file does run its command."""
    path, _ = bad_checkpoint("code-in-pickle", tmp_path)
    torch.load(path, weights_only=False)
    assert (tmp_path / "pwned").exists()


def corrupt_input(kind: str, tmp_path):
    """(script arguments, expected words) for a bad input to each of the other converters."""
    if kind == "truncated-safetensors":
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(
            vocab_size=320, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
        )))
        (tmp_path / "hf" / "model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":")
        return ["scripts/convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path / "hf"], "not a readable safetensors"
    if kind == "not-gguf":
        (tmp_path / "model.gguf").write_text("not a gguf file")
        return ["scripts/convert_gguf_checkpoint.py", "--gguf_path", tmp_path / "model.gguf"], "not a readable GGUF"
    if kind == "no-meta-files":
        return ["scripts/convert_checkpoint.py", "--checkpoint_dir", tmp_path], "consolidated.*.pth"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated-safetensors", "not-gguf", "no-meta-files"])
def test_converters_refuse_bad_input_in_one_line(tmp_path, kind):
    args, expected = corrupt_input(kind, tmp_path)
    result = run_script(*args, "--output_dir", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and expected in result.stderr
    assert not (tmp_path / "out").exists()
