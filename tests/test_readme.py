"""The README's shell blocks, run as written, in order, against the sandbox.

Every command of every ``sh`` block runs through the CLI in a temporary folder holding a copy of
the repository's ``jobs/`` and ``sample_data/``, in the README's order (later commands read what
earlier ones wrote), and must exit 0. What is not run exactly as written, and why:

- ``export VAR=...`` sets ``VAR`` to the key of the stand-in server below (``...`` is the user's key).
- Commands for real (no ``--sandbox``) talk to a stand-in sandbox: ``DATAOORTS_ENDPOINT`` points the
  Dataoorts provider at it (the README's own way, "Point batchllm at it with ..."), and the OpenAI
  base URL ``http://127.0.0.1:8000/v1`` gets the stand-in's port (the README serves it on 8000 with
  ``batchllm sandbox --port 8000``; a fixed port may be taken on a shared machine).
- A fleet run for real gets ``--sandbox`` (its endpoints are remote hosts; the README: "``--sandbox``
  with a fleet starts one sandbox per endpoint").
- The user's own files the README names (``prompts.csv``, ``prompts.parquet``, ``requests.jsonl``)
  are written from the sample data; ``results.jsonl errors.jsonl`` (what a batch API returns) are
  made by answering the export the README made before, line by line, against the stand-in.
- ``SKIPPED`` below: commands that need a service the tests cannot start in seconds, with why.
- ``make`` lines name a target of the Makefile; cron lines are checked for shape (five time
  fields, a job file that exists, flags ``run`` takes).
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from .conftest import ROOT, run_cli
from .test_openai_batch import answer_batch

README = ROOT / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)

# (pattern searched in the command line, why it is not run here)
SKIPPED = [
    (r"review (export|import) .*http://localhost:8080", "needs a Label Studio server (tests/test_review.py)"),
    (r"eval \S+ --gold review", "needs the verdicts of the Label Studio import skipped above"),
    (r"--engine ray", "needs Ray and the user's data or cluster (tests/test_ray.py)"),
]


def commands(text: str) -> list[tuple[str, str]]:
    """(block language, one logical command line) for every command of every block, in order."""
    out = []
    for match in BLOCK.finditer(text):
        lang, body = match.group(1), match.group(2)
        for line in body.replace("\\\n", " ").splitlines():
            if lang == "cron":
                if line.strip() and not line.lstrip().startswith("#"):
                    out.append((lang, line))
            elif shlex.split(line, comments=True):
                out.append((lang, line))
    return out


def _user_files(folder: Path) -> None:
    """Stand-ins for the user's own files the README names, from the sample reviews."""
    reviews = pacsv.read_csv(folder / "sample_data" / "reviews.csv").slice(0, 40)
    prompts = reviews.append_column(
        "prompt",
        pa.array([f"Classify the sentiment of this review: {r}" for r in reviews["review"].to_pylist()]),
    )
    pq.write_table(prompts, folder / "prompts.parquet")
    pacsv.write_csv(prompts, folder / "prompts.csv")
    lines = [
        orjson.dumps(
            {
                "custom_id": f"q{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "meta-llama/Llama-3.1-70B-Instruct",
                    "max_tokens": 16,
                    "messages": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
                },
            }
        ).decode()
        for i in range(10)
    ]
    (folder / "requests.jsonl").write_text("\n".join(lines) + "\n")


def _check_cron(line: str) -> None:
    fields = line.split(None, 5)
    assert len(fields) == 6, line
    for value in fields[:5]:
        assert re.fullmatch(r"[0-9*,/-]+", value), f"not a cron time field: {value!r} in {line}"
    command = fields[5]
    job = re.search(r"--job (\S+)", command)
    assert job is not None and (ROOT / job.group(1)).is_file(), command
    flags = set(re.findall(r"(?<= )--[a-z-]+", command))
    help_text = run_cli(["run", "--help"]).output
    assert all(flag in help_text for flag in flags), f"{command}: flags not in `run --help`"


def _check_make(words: list[str]) -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in words[1:]:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.MULTILINE), f"no make target {target}"


@pytest.mark.timeout(900)
def test_every_readme_command_runs(sandbox_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("jobs", "sample_data"):
        shutil.copytree(ROOT / name, tmp_path / name)
    _user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    box = sandbox_factory()  # the Dataoorts API, for commands run for real
    local = sandbox_factory(require_key=False)  # a local OpenAI-compatible server (no key)
    env = {"DATAOORTS_ENDPOINT": box.url}
    port = local.base.rsplit(":", 1)[1]
    ran = skipped = 0
    for lang, line in commands(README.read_text()):
        if lang == "cron":
            _check_cron(line)
            continue
        words = shlex.split(line, comments=True)
        if words[0] == "make":
            _check_make(words)
            continue
        if words[0] == "export":
            name, _, value = words[1].partition("=")
            env[name] = box.key if value == "..." else value
            continue
        assert words[0] == "batchllm", f"a README command this test does not know: {line}"
        why = next((why for pattern, why in SKIPPED if re.search(pattern, line)), None)
        if why is not None:
            skipped += 1
            continue
        args = [w.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for w in words[1:]]
        if "--fleet" in args and args[0] == "run" and "--sandbox" not in args:
            args.append("--sandbox")
        if args[0] == "import-batch":
            answer_batch(local, tmp_path / "out" / "requests.jsonl", tmp_path / args[1], tmp_path / args[2])
        result = run_cli(args, env=env)
        assert result.exit_code == 0, f"`{line.strip()}` exited {result.exit_code}:\n{result.output}"
        ran += 1
    assert ran >= 25 and skipped <= 2 * len(SKIPPED), (ran, skipped)  # the skips stay the exception
