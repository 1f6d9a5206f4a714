"""The guides work as written: every `python <script> ...` command in README.md and howto/*.md parses with the
script's own flags (a flag that does not exist, or a value of the wrong type, fails here, not for a reader), and the
task YAML of howto/evaluate.md loads without a warning."""
import re
import shlex

import pytest

from conftest import REPO
from test_bad_inputs import run_in_process

SCRIPT = re.compile(r"(scripts|finetune|generate)/\w+\.py")


def guide_commands() -> list[tuple[str, list[str]]]:
    """(guide, [script, *arguments]) for each command in a bash block; `...` where the guide elides arguments is
    dropped, `<placeholder>` becomes a word."""
    commands = []
    for guide in [REPO / "README.md", *sorted((REPO / "howto").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", guide.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"<[^>]+>", "placeholder", line)
                try:
                    words = shlex.split(line, comments=True)
                except ValueError:  # a multi-line string of another tool's command (llama.cpp's)
                    continue
                if words[:1] == ["python"] and len(words) > 1 and SCRIPT.fullmatch(words[1]):
                    arguments = [w for i, w in enumerate(words[2:]) if w != "..." or words[2:][i - 1].startswith("--")]
                    commands.append((guide.name, [words[1], *arguments]))
    return commands


COMMANDS = guide_commands()


def test_the_guides_hold_commands_for_every_flow():
    scripts = {script for _, (script, *_) in COMMANDS}
    assert len(COMMANDS) >= 40 and {"finetune/lora.py", "scripts/serve.py", "generate/chat.py",
                                    "scripts/prepare_chat.py", "scripts/convert_to_gguf.py"} <= scripts


@pytest.mark.parametrize("guide, command", COMMANDS, ids=[f"{g}:{c[0]}:{i}" for i, (g, c) in enumerate(COMMANDS)])
def test_every_guide_command_parses_with_the_scripts_flags(guide, command, capsys):
    script, *arguments = command
    code, trace = run_in_process(script, [*arguments, "--print_config"])
    err = capsys.readouterr().err
    assert code == 0 and not trace, f"{guide}: python {shlex.join(command)}\n{err}{trace}"


def test_the_task_yaml_of_the_evaluation_guide_loads_without_warnings(tmp_path, caplog):
    pytest.importorskip("lm_eval")
    from lit_llama.harness import task_manager

    text = (REPO / "howto" / "evaluate.md").read_text()
    yaml = re.search(r"```yaml\n# my_tasks/colors.yaml\n(.*?)```", text, re.S).group(1)
    data = tmp_path / "colors.json"
    data.write_text('[{"question": "Colour of the sky?", "choices": ["red", "blue"], "label": 1}]')
    (tmp_path / "my_tasks").mkdir()
    (tmp_path / "my_tasks" / "colors.yaml").write_text(re.sub(r"/data/colors\.json", str(data), yaml))
    with caplog.at_level("WARNING"):
        manager = task_manager(["colors"], tmp_path / "my_tasks")
        from lm_eval.tasks import get_task_dict

        tasks = get_task_dict(["colors"], manager)
    assert "colors" in tasks
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "colors" in r.getMessage()], caplog.text
