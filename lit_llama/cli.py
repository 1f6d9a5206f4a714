"""How every script starts: a jsonargparse CLI (`-h`, `--config file.yaml`), and problems with the user's input
reported as one line on stderr with exit code 2 instead of a traceback.

`main` takes its flags as keyword parameters, or as one dataclass parameter whose fields (and their dataclasses'
fields, as `--train.learning_rate`) become the flags: the way scripts share settings without repeating them.
"""
import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Callable

from jsonargparse import CLI
from jsonargparse.typing import register_type

from lit_llama.errors import UserError


class OutputPath(type(Path())):
    """A path a script writes to. An empty one is refused: it would become "." and write into the working
    directory."""


def parse_output_path(value) -> OutputPath:
    if str(value).strip() == "":
        raise ValueError("an empty path would write into the working directory: name a directory or file")
    return OutputPath(value)


register_type(OutputPath, serializer=str, deserializer=parse_output_path)


def run_cli(main: Callable) -> None:
    try:
        parameters = list(inspect.signature(main).parameters.values())
        settings = parameters[0].annotation if len(parameters) == 1 else None
        if dataclasses.is_dataclass(settings):
            main(CLI(settings, as_positional=False))
        else:
            CLI(main, as_positional=False)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
