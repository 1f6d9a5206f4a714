"""No writer replaces what it did not make: every script that writes files refuses to write onto one of its own
inputs (even with --overwrite true, even through a hard link) and refuses to replace an existing output unless
--overwrite true is given; either way the file that was there is byte-identical afterwards."""
import inspect
import os
import runpy
import shutil
from pathlib import Path
from typing import Callable

import pytest

from conftest import REPO
from lit_llama.checkpoint import CHECKPOINT_NAME
from lit_llama.files import check_outputs
from lit_llama.errors import UserError
from test_bad_inputs import World, build_world, run_in_process

OUTPUT_FLAGS = ("output_path", "output_dir", "output_json", "destination_path")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("world"))


def base_copy(world: World, tmp: Path) -> Path:
    directory = tmp / "ckpt"
    shutil.copytree(world.base.parent, directory)
    return directory


def records(tmp: Path, directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text('[{"instruction": "Say hi.", "input": "", "output": "hi"}]')
    return path


def conversations(tmp: Path, directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text('[{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}]}]')
    return path


def meta_checkpoint(tmp: Path) -> Path:
    """Meta's layout (shards, params.json, tokenizer.model): the outputs are checked before any shard is read."""
    directory = tmp / "meta"
    directory.mkdir()
    (directory / "consolidated.00.pth").write_bytes(b"not read")
    (directory / "params.json").write_text("{}")
    (directory / "tokenizer.model").write_bytes(b"the user's tokenizer")
    return directory


def onto_an_input(script: str) -> Callable[[World, Path], tuple[list, Path]]:
    """(arguments whose output lands on an input file, that input file), per writer."""

    def make(world: World, tmp: Path) -> tuple[list, Path]:
        base = base_copy(world, tmp)
        if script == "scripts/convert_to_gguf.py":
            return ["--checkpoint_path", base / CHECKPOINT_NAME, "--output_path", base / CHECKPOINT_NAME], \
                base / CHECKPOINT_NAME
        if script == "scripts/convert_gguf_checkpoint.py":
            gguf = base / CHECKPOINT_NAME  # a GGUF file named like the weights it would be converted to
            shutil.copyfile(world.gguf, gguf)
            return ["--gguf_path", gguf, "--output_dir", base], gguf
        if script == "scripts/convert_hf_checkpoint.py":
            hf = tmp / "hf"
            shutil.copytree(world.hf, hf)
            return ["--checkpoint_dir", hf, "--output_dir", hf], hf / "tokenizer.json"
        if script == "scripts/convert_lit_checkpoint.py":
            return ["--checkpoint_path", base / CHECKPOINT_NAME, "--output_dir", base], base / "tokenizer.json"
        if script == "scripts/convert_checkpoint.py":
            meta = meta_checkpoint(tmp)
            return ["--checkpoint_dir", meta, "--output_dir", meta], meta / "tokenizer.model"
        if script == "scripts/merge_lora.py":
            return ["--finetuned_path", world.lora, "--checkpoint_path", base / CHECKPOINT_NAME, "--output_dir", base], \
                base / CHECKPOINT_NAME
        if script == "scripts/convert_lora_to_peft.py":
            run = tmp / "run"
            shutil.copytree(world.run, run)
            out = tmp / "peft"
            out.mkdir()
            os.link(run / "finetune_config.json", out / "adapter_config.json")  # a hard link to an input
            return ["--finetuned_path", run / world.lora.name, "--checkpoint_path", base / CHECKPOINT_NAME,
                    "--output_dir", out], run / "finetune_config.json"
        if script == "scripts/convert_peft_to_lora.py":
            adapter, out = tmp / "adapter", tmp / "imported"
            adapter.mkdir()
            out.mkdir()
            (adapter / "adapter_config.json").write_text('{"r": 8}')
            os.link(adapter / "adapter_config.json", out / "finetune_config.json")
            return ["--adapter_dir", adapter, "--checkpoint_path", base / CHECKPOINT_NAME, "--output_dir", out,
                    "--overwrite", "true"], adapter / "adapter_config.json"
        if script == "scripts/evaluate_tasks.py":
            data = tmp / "data"
            shutil.copytree(world.data, data)
            return ["--checkpoint_path", base / CHECKPOINT_NAME, "--data_dir", data, "--output_json",
                    data / "test.json"], data / "test.json"
        if script == "scripts/evaluate_harness.py":
            return ["--tasks", "arc_easy", "--checkpoint_path", base / CHECKPOINT_NAME, "--output_json",
                    base / "model_config.json"], base / "model_config.json"
        if script == "scripts/prepare_builtin.py":
            destination = tmp / "dest"
            destination.mkdir()
            os.link(base / "tokenizer.json", destination / "meta.json")
            return ["--checkpoint_dir", base, "--destination_path", destination], base / "tokenizer.json"
        if script == "scripts/prepare_chat.py":
            data_file = conversations(tmp, tmp / "dest", "test.json")
        else:  # prepare_json, prepare_alpaca, prepare_dolly: the records file is one of the files written
            data_file = records(tmp, tmp / "dest", "test.json")
        return ["--data_file", data_file, "--checkpoint_dir", base, "--destination_path", tmp / "dest",
                "--overwrite", "true"], data_file

    return make


def an_existing_output(script: str) -> Callable[[World, Path], tuple[list, Path]]:
    """(arguments whose output would replace a file the user made, that file)."""

    def make(world: World, tmp: Path) -> tuple[list, Path]:
        args, _ = onto_an_input(script)(world, tmp)
        flag = next(i for i, a in enumerate(args) if str(a).lstrip("-") in OUTPUT_FLAGS)
        args = [a for a in args if a not in ("--overwrite", "true")]
        mine = tmp / "mine"
        mine.mkdir()
        args[flag + 1] = mine / "mine.json" if script.startswith(("scripts/convert_to", "scripts/evaluate")) else mine
        target = {"scripts/convert_to_gguf.py": "mine.json", "scripts/evaluate_tasks.py": "mine.json",
                  "scripts/evaluate_harness.py": "mine.json", "scripts/convert_lit_checkpoint.py": "config.json",
                  "scripts/convert_lora_to_peft.py": "adapter_config.json",
                  "scripts/convert_peft_to_lora.py": "finetune_config.json"}.get(script)
        target = mine / (target or ("meta.json" if "prepare" in script else "model_config.json"))
        target.write_text('{"made by": "the user"}')
        return args, target

    return make


def writers() -> list[str]:
    """Every script with an output option, found by reading their signatures (a new writer joins the tests)."""
    found = []
    for path in sorted((REPO / "scripts").glob("*.py")):
        main = runpy.run_path(str(path), run_name="inspected")["main"]
        parameters = inspect.signature(main).parameters
        (only,) = parameters.values() if len(parameters) == 1 else (None,)
        names = set(only.annotation.__dataclass_fields__) if only is not None and hasattr(
            only.annotation, "__dataclass_fields__") else set(parameters)
        if names & set(OUTPUT_FLAGS):
            found.append(f"scripts/{path.name}")
            assert "overwrite" in names, f"{path.name} writes files but takes no --overwrite"
    return found


WRITERS = [script for script in writers() if script != "scripts/quickstart.py"]


def test_every_writer_is_found_and_tested():
    assert len(WRITERS) >= 15 and "scripts/convert_to_gguf.py" in WRITERS and "scripts/prepare_chat.py" in WRITERS


def refused_keeping(script: str, args: list, kept: Path, capsys) -> str:
    """Run `script`; it must exit 2 with no traceback and leave `kept` byte-identical. Returns its last stderr line."""
    before = kept.read_bytes()
    code, trace = run_in_process(script, args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not trace and lines and "Traceback" not in "\n".join(lines), (trace, lines)
    assert kept.read_bytes() == before
    return lines[-1]


@pytest.mark.parametrize("script", WRITERS)
def test_no_writer_writes_onto_one_of_its_inputs(script, world, tmp_path, capsys):
    args, input_file = onto_an_input(script)(world, tmp_path)
    assert "one of this command's inputs" in refused_keeping(script, args, input_file, capsys)


@pytest.mark.parametrize("script", WRITERS)
def test_no_writer_replaces_an_existing_output_without_overwrite(script, world, tmp_path, capsys):
    args, mine = an_existing_output(script)(world, tmp_path)
    line = refused_keeping(script, args, mine, capsys)
    assert "--overwrite true" in line and str(mine) in line, line


def test_overwrite_replaces_an_earlier_output_and_a_second_conversion_needs_it(world, tmp_path, capsys):
    out = tmp_path / "hf"
    args = ["--checkpoint_path", world.base, "--output_dir", out]
    assert run_in_process("scripts/convert_lit_checkpoint.py", args) == (0, "")
    first = (out / "model.safetensors").read_bytes()
    assert run_in_process("scripts/convert_lit_checkpoint.py", args)[0] == 2
    assert run_in_process("scripts/convert_lit_checkpoint.py", [*args, "--overwrite", "true"]) == (0, "")
    assert (out / "model.safetensors").read_bytes() == first


def test_a_symbolic_link_to_an_input_counts_as_that_input(tmp_path):
    source = tmp_path / "weights.pth"
    source.write_bytes(b"weights")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.gguf").symlink_to(source)
    with pytest.raises(UserError, match="one of this command's inputs"):
        check_outputs("--output_path", [tmp_path / "out" / "model.gguf"], [tmp_path], overwrite=True)
    assert source.read_bytes() == b"weights"
