import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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
