"""How every script starts: a jsonargparse CLI from the function signature (`-h`, `--config file.yaml`), and
problems with the user's input reported as one line on stderr with exit code 2 instead of a traceback."""
import sys
from typing import Callable

from jsonargparse import CLI

from lit_llama.errors import UserError


def run_cli(main: Callable) -> None:
    try:
        CLI(main, as_positional=False)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
