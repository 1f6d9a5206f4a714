"""Reading and writing files safely: every write goes to a temporary file beside the target that is flushed to disk
and then renamed into place (an interrupted or failed write never leaves a half-written file under the real name),
and loading never unpickles Python objects (`weights_only=True`)."""
import json
import os
import pickle
import re
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch

from lit_llama.errors import UserError

TEMPORARY_SUFFIX = ".tmp"  # `.<name>.<random>.tmp`: what a killed write leaves behind


@contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is synced and renamed to `path`, on failure removed."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


@contextmanager
def atomic_paths(paths: Sequence[Union[str, Path]]) -> Iterator[list[Path]]:
    """Temporary paths beside several files that belong together (weights and their config, a dataset's files).
    Only once every one is written are they synced and renamed into place, in the order given (put the file that
    marks the set complete last); a failure before that removes the temporaries and leaves the old files as they
    were."""
    paths = [Path(path) for path in paths]
    temporaries = []
    try:
        for path in paths:
            temporaries.append(temporary_beside(path))
        yield temporaries
        for tmp in temporaries:  # the data reaches the disk before the names do: no empty file after a crash
            sync(tmp)
        for tmp, path in zip(temporaries, paths):
            os.replace(tmp, path)
        for directory in {path.parent for path in paths}:
            sync(directory)
    except OSError as error:  # a full disk, a quota, a file-size limit: the old files are still in place
        names = ", ".join(path.name for path in paths)
        raise UserError(f"cannot write {names} in {paths[0].parent}: {error.strerror or error}") from None
    finally:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)


def temporary_beside(path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    except OSError as error:
        raise UserError(f"cannot write to {path.parent}: {error.strerror}") from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes files private; a checkpoint is not a secret
    return Path(tmp)


def sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_torch(obj, path: Union[str, Path]) -> None:
    save_all([(path, obj)])


def save_json(obj, path: Union[str, Path]) -> None:
    save_all([(path, obj)])


def save_all(files: Sequence[tuple[Union[str, Path], object]]) -> None:
    """Write several files as one (`atomic_paths`): `*.json` as JSON, `*.safetensors` (a dict of tensors) as
    safetensors, anything else with torch.save."""
    with atomic_paths([path for path, _ in files]) as temporaries:
        for tmp, (path, obj) in zip(temporaries, files):
            if str(path).endswith(".json"):
                tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
            elif str(path).endswith(".safetensors"):
                from safetensors import SafetensorError
                from safetensors.torch import save_file

                try:
                    save_file(obj, str(tmp), metadata={"format": "pt"})
                except SafetensorError as error:  # its I/O errors (a full disk) come as this
                    raise UserError(f"cannot write {path}: {error}") from None
            else:
                try:
                    torch.save(obj, tmp)
                except RuntimeError as error:  # torch's zip writer reports a failed write (a full disk) this way
                    raise UserError(f"cannot write {path} (is the disk full?): {str(error).splitlines()[0]}") from None


def load_torch(path: Union[str, Path], mmap: bool = True):
    """torch.load that only accepts tensors and plain containers, with one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        if mmap and not zipfile.is_zipfile(path):  # the legacy (pre-1.6) format cannot be memory-mapped
            mmap = False
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as error:
        culprit = re.search(r"GLOBAL (\S+)", str(error))
        if culprit is None:  # bytes the unpickler could not even read: damage, not a hostile object
            raise UserError(f"{path} is truncated or corrupt and cannot be read (not a checkpoint)") from None
        raise UserError(f"refusing to load {path}: it holds Python objects such as {culprit.group(1)}, not just "
                        "tensors") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError, KeyError,
            TypeError) as error:  # what torch's two readers raise for bytes that are not a checkpoint
        raise UserError(f"{path} is truncated or corrupt and cannot be read ({type(error).__name__})") from None


def read_json(path: Union[str, Path]):
    """A JSON file the user gave us, with a one-line error when it is not valid JSON, not UTF-8, or nested too deeply
    for the parser."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None
    except RecursionError:
        raise UserError(f"{path} is nested too deeply to be read as JSON") from None


def read_json_object(path: Union[str, Path]) -> dict:
    value = read_json(path)
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def check_can_write(path: Path, flag: str) -> None:
    """Before long work, without creating anything: `path` is not a directory and the nearest existing folder above
    it is a writable directory (the rest is created when the result is written). `flag` names the option."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory: name a file in it")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write {flag} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {flag} {path}: {existing} is not writable")


def check_outputs(flag: str, outputs: Sequence[Union[str, Path]], inputs: Sequence[Union[str, Path, None]] = (),
                  overwrite: bool = False) -> None:
    """The policy every writer follows, checked before any long work: an output is never one of the command's inputs
    (compared as files, so a symbolic or hard link to an input counts), an existing output is replaced only with
    --overwrite, and the place is writable. `inputs` may name directories: each file directly in one is an input.
    `flag` names the option that chose the outputs."""
    outputs = [Path(path) for path in outputs]
    for path in outputs:
        check_can_write(path, flag)
    existing = [path for path in outputs if path.exists()]
    for path in existing:
        for source in input_files(inputs):
            if os.path.samefile(path, source):
                raise UserError(f"{flag} would write {path} over {source}, one of this command's inputs: choose "
                                "another path (nothing was changed)")
    if existing and not overwrite:
        names = ", ".join(str(path) for path in existing)
        raise UserError(f"{flag}: {names} exist{'s' if len(existing) == 1 else ''} already: pass --overwrite true "
                        "to replace, or choose another path (nothing was changed)")


def input_files(inputs: Sequence[Union[str, Path, None]]) -> Iterator[Path]:
    for path in inputs:
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            yield from (child for child in path.iterdir() if child.is_file())
        elif path.exists():
            yield path
