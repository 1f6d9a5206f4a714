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
    "generate/base.py": lambda path, tmp: ["--checkpoint_path", path, "--max_new_tokens", "1", "--precision", "32-true"],
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
    if kind == "code-in-pickle":
        torch.save({"transformer.wte.weight": RunsCode(tmp_path / "pwned")}, path)
        return path, "refusing"
    raise AssertionError(kind)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("kind", ["missing", "wrong-shapes", "truncated", "code-in-pickle"])
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
