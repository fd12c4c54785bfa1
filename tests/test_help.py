"""Grouped ``--help`` (batchllm/cli/help.py): what a first run needs on the first screen, every
option exactly once, each with its job key."""

from __future__ import annotations

import re

import click
import pytest

from batchllm.cli import cli
from batchllm.cli.help import GroupedCommand, job_key_note
from batchllm.job_keys import JOB_KEYS
from tests.conftest import run_cli, spawn

GROUPED = [
    ["run"],
    ["estimate"],
    ["export-batch"],
    ["import-batch"],
    ["review", "export"],
    ["review", "import"],
]
HEADING = re.compile(r"^[A-Z][A-Za-z -]*:$")


def _help(words: list[str]) -> list[str]:
    result = run_cli([*words, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def _command(words: list[str]) -> click.Command:
    command: click.Command = cli
    for word in words:
        assert isinstance(command, click.Group)
        command = command.commands[word]
    return command


def test_run_help_shows_a_first_run_on_its_first_screen() -> None:
    lines = _help(["run"])
    headings = [line for line in lines if HEADING.match(line) and not line.startswith("Usage")]
    assert len(headings) >= 5, headings
    first = "\n".join(lines[:60])
    assert "run [OPTIONS] INPUT" in lines[0]
    for flag in (
        "-o, --output",
        "--template ",
        "--labels ",
        "--provider ",
        "--model ",
        "--sandbox",
        "--max-cost ",
    ):
        assert flag in first, flag
    assert {"Exit codes:", "Examples:"} <= {line.strip() for line in lines}


@pytest.mark.parametrize("words", GROUPED, ids=" ".join)
def test_every_option_shows_once_under_a_heading(words: list[str]) -> None:
    lines = _help(words)
    epilog = next(
        i for i, line in enumerate(lines) if line.strip() in ("Exit codes:", "Examples:", "Example:")
    )
    first = next(i for i, line in enumerate(lines) if HEADING.match(line) and "Usage" not in line)
    starts = [line.strip() for line in lines[first:epilog] if line.startswith("  -")]
    for param in _command(words).params:
        if not isinstance(param, click.Option):
            continue
        names = ", ".join(param.opts)
        assert sum(1 for s in starts if s == names or s.startswith(names + " ")) == 1, names
    assert len(starts) == sum(isinstance(p, click.Option) for p in _command(words).params) + 1  # --help


@pytest.mark.parametrize("words", [w for w in GROUPED if w[0] != "review"], ids=" ".join)
def test_every_option_with_a_job_key_names_it(words: list[str]) -> None:
    text = " ".join(" ".join(_help(words)).split())  # unwrapped
    checked = 0
    for param in _command(words).params:
        if isinstance(param, click.Option) and param.name is not None and job_key_note(param.name):
            assert job_key_note(param.name) in text, param.name
            checked += 1
    assert checked >= 10
    assert "job key: ledger; env: BATCHLLM_LEDGER" in text or words[0] == "export-batch"


def test_job_key_note_reads_the_job_key_table() -> None:
    assert job_key_note("max_cost") == "job key: max_cost"
    assert job_key_note("input_path") == "job key: input"
    assert job_key_note("endpoint").startswith("job key: endpoint; env: DATAOORTS_ENDPOINT")
    assert job_key_note("pilot") == ""
    assert set(JOB_KEYS) >= {"ledger", "endpoint", "input"}


def test_an_option_in_no_group_still_shows_under_other() -> None:
    @click.command(cls=GroupedCommand)
    @click.option("--template", help="Prompt.")
    @click.option("--brand-new-flag", help="Nobody placed me yet.")
    def command(**params: object) -> None:
        pass

    output = click.testing.CliRunner().invoke(command, ["--help"]).output
    lines = output.splitlines()
    assert lines.index("Prompt:") < lines.index("Other:")
    other = lines[lines.index("Other:") :]
    assert any(line.strip().startswith("--brand-new-flag") for line in other)
    assert "Options:" not in lines


def _complete(words: str, shell: str = "bash") -> list[str]:
    """What the shell would offer after ``words``, asked of the real executable as click's
    completion script asks it."""
    env = {
        "_BATCHLLM_COMPLETE": f"{shell}_complete",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
    }
    process = spawn([], env=env)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return out.splitlines()


def test_choices_models_and_paths_complete_in_the_shell() -> None:
    assert _complete("batchllm run --provider ") == ["plain,dataoorts", "plain,openai"]
    assert _complete("batchllm estimate --structured o") == ["plain,on", "plain,off"]
    models = _complete("batchllm run --provider openai --model ")
    assert models and all(m.startswith("plain,") for m in models) and "plain,gpt-4o-mini" in models
    assert "plain,meta/llama-3.1-70b-instruct" in _complete("batchllm run --model meta/")
    assert _complete("batchllm run --job jo") == ["file,jo"]  # the shell completes it as a path
    assert _complete("batchllm run -o out/") == ["file,out/"]
    assert _complete("batchllm i") == ["plain,import-batch", "plain,init"]


def test_the_completion_script_is_printed_for_each_shell() -> None:
    for shell, marker in (
        ("bash", "complete -o"),
        ("zsh", "#compdef batchllm"),
        ("fish", "complete --no-files"),
    ):
        process = spawn([], env={"_BATCHLLM_COMPLETE": f"{shell}_source"})
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0 and marker in out, shell
