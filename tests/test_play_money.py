"""Play money stays play money: an output batchllm's sandbox answered says so wherever its cost is
shown (the run's summary, `status`, `report`, `eval`), and its answers never mix with a real
server's in one output, whichever came first. The "real server" here is the test sandbox unmarked:
its answers do not say they are the sandbox's, as a real server's do not (``marked``)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import Result

from batchllm.engine.journal import Journal

from .conftest import ROOT, prompts_csv, run_cli, summary_of
from .test_fleet import _live_fleet
from .test_openai_batch import BATCH_PRICES, JOB, LIVE_PRICES, answer_batch

PRICES = ["--provider", "openai", "--input-price", "0.31", "--output-price", "0.34", "--rpm", "0"]
PLAY = "play money: batchllm's sandbox answered"


def _run(src: Path, out: Path, env: dict[str, str], *extra: str):
    return run_cli(["run", str(src), "-o", str(out), "--max-tokens", "16", *PRICES, *extra], env=env)


def test_sandbox_answers_never_mix_with_real_ones_in_one_output(sandbox_factory, tmp_path: Path) -> None:
    first, more = prompts_csv(tmp_path / "a.csv", 20), prompts_csv(tmp_path / "b.csv", 30)
    sandbox, real = sandbox_factory(marked=True), sandbox_factory()
    served, elsewhere = sandbox.openai_env(), real.openai_env()

    # A real output: the sandbox may not add its answers to it.
    real_out = tmp_path / "real.parquet"
    result = _run(first, real_out, elsewhere)
    assert result.exit_code == 0, result.output
    assert PLAY not in result.output and "play_money" not in summary_of(real_out)
    sent = sandbox.count()
    refused = _run(more, real_out, served)
    assert refused.exit_code == 2, refused.output
    at = sandbox.base.removeprefix("http://")
    assert (
        f"real.parquet holds 20 answered rows from a real server, and the server at {at} is batchllm's sandbox"
        in (refused.stderr)
    )
    assert sandbox.count() == sent  # nothing sent
    # The refused run is not the one to resume with: `status` keeps the last run that ran.
    journal = Journal.open_readonly(real_out.with_name(real_out.name + ".batchllm"))
    assert journal.get_meta("last_run")["input"] == str(first)
    journal.conn.close()

    # A sandbox output: a real server may not add its answers to it, until --restart.
    play_out = tmp_path / "play.parquet"
    result = _run(first, play_out, served)
    assert result.exit_code == 0 and PLAY in result.output, result.output
    assert summary_of(play_out)["play_money"] is True
    forwarded = real.count()
    refused = _run(more, play_out, elsewhere)
    assert refused.exit_code == 2, refused.output
    assert "play.parquet holds 20 answered rows from batchllm's sandbox (play money" in refused.stderr
    assert real.count() == forwarded  # nothing sent
    resumed = _run(more, play_out, served)  # the sandbox again: resumed
    assert resumed.exit_code == 0 and "10 to send (20 already done)" in resumed.output, resumed.output
    assert PLAY in run_cli(["status", str(play_out)]).output
    report = run_cli(["report", str(play_out), "--format", "json"])
    assert json.loads(report.stdout)["play_money"] is True
    assert PLAY in run_cli(["report", str(play_out)]).output

    restarted = _run(more, play_out, elsewhere, "--restart")
    assert restarted.exit_code == 0, restarted.output
    assert real.count() == forwarded + 30
    assert PLAY not in restarted.output and "play_money" not in summary_of(play_out)
    assert PLAY not in run_cli(["status", str(play_out)]).output


def test_a_sandbox_run_that_answered_nothing_leaves_no_mark(sandbox_factory, tmp_path: Path) -> None:
    """Stopped before any answer, a --sandbox run's output holds no play money: a real run that
    takes it over (nothing was paid) is not called play money."""
    src, out = prompts_csv(tmp_path / "a.csv", 20), tmp_path / "o.parquet"
    args = ["run", str(src), "-o", str(out), "--rpm", "0", "--max-tokens", "16"]
    stopped = run_cli([*args, "--sandbox", "--max-cost-per-run", "0.0000001"])
    assert stopped.exit_code == 3, stopped.output
    real = sandbox_factory()
    result = run_cli(args, env=real.env())
    assert result.exit_code == 0 and real.count() == 20, result.output
    assert PLAY not in result.output and PLAY not in run_cli(["status", str(out)]).output


def test_eval_of_sandbox_labels_says_they_are_not_the_models(sandbox_factory, tmp_path: Path) -> None:
    sandbox = sandbox_factory(marked=True)
    out = tmp_path / "labels.parquet"
    job = ["run", "--job", str(ROOT / "jobs" / "sentiment.toml"), "-o", str(out), "--rpm", "0"]
    assert run_cli(job, env=sandbox.env()).exit_code == 0
    result = run_cli(["eval", str(out), "--gold", "human_label"])
    assert result.exit_code == 0, result.output
    assert (
        "the sandbox's labels (emulated, with a built-in error rate): not the model's accuracy"
        in result.output
    )


def test_the_built_in_sandbox_is_play_money_and_resumes_its_own_output(
    sandbox_factory, tmp_path: Path
) -> None:
    """--sandbox's emulator marks no answer (the served one does): the run knows it all the same."""
    out = tmp_path / "o.parquet"
    first = run_cli(
        ["run", str(prompts_csv(tmp_path / "a.csv", 20)), "-o", str(out), "--sandbox", "--rpm", "0"]
    )
    assert first.exit_code == 0 and PLAY in first.output, first.output
    more = run_cli(
        ["run", str(prompts_csv(tmp_path / "b.csv", 30)), "-o", str(out), "--sandbox", "--rpm", "0"]
    )
    assert more.exit_code == 0 and "10 to send (20 already done)" in more.output, more.output
    assert PLAY in more.output and summary_of(out)["play_money"] is True


def test_the_sandboxs_cached_replies_never_answer_a_real_server_at_its_address(
    sandbox_factory, tmp_path: Path
) -> None:
    """`batchllm sandbox --port 8000` first, a real server on port 8000 later (the README's own
    way): the sandbox's replies are cached as the sandbox's, not as that address's."""
    served = sandbox_factory(marked=True)
    port = int(served.base.rsplit(":", 1)[1])
    src = prompts_csv(tmp_path / "a.csv", 20)
    played = _run(src, tmp_path / "play.parquet", served.openai_env(), "--temperature", "0")
    assert played.exit_code == 0 and PLAY in played.output, played.output
    served.stop()
    real = sandbox_factory(port=port)  # unmarked: a real server, as batchllm sees it
    result = _run(src, tmp_path / "real.parquet", real.openai_env(), "--temperature", "0")
    assert result.exit_code == 0 and real.count() == 20, result.output  # none from the cache
    assert PLAY not in result.output
    again = _run(src, tmp_path / "real2.parquet", real.openai_env(), "--temperature", "0")
    assert again.exit_code == 0 and real.count() == 20  # its own replies are cached as usual


def test_a_sandbox_pilot_says_its_figures_are_the_emulators(tmp_path: Path) -> None:
    """`estimate --pilot --sandbox`: its accuracy and lengths are the emulator's; `status` of its
    output names the command that sends the rest (the estimate again would send nothing)."""
    out = tmp_path / "r.parquet"
    args = ["estimate", str(ROOT / "sample_data" / "reviews.csv"), "--template", "Classify: {review}"]
    args += ["--labels", "positive,negative,neutral", "--max-tokens", "16", "--pilot", "20", "-o", str(out)]
    result = run_cli([*args, "--sandbox", "--gold", "human_label", "--rpm", "0"])
    assert result.exit_code == 0, result.output
    assert "the pilot ran on batchllm's sandbox: its lengths and accuracy are the emulator's" in result.stdout
    status = run_cli(["status", str(out)]).stdout
    assert "`batchllm run` with the same settings sends the rest" in status and "resume with" not in status


def test_a_fleet_of_the_sandbox_and_a_real_server_is_refused(sandbox_factory, tmp_path: Path) -> None:
    """A fleet file pointing one endpoint at a served sandbox and one at a real server would mix
    play answers with real ones in one output, the sandbox's counted as spend: refused before
    anything is sent. All of it the sandbox's: play money, as one endpoint's is."""
    play, other, real = sandbox_factory(marked=True), sandbox_factory(marked=True), sandbox_factory()
    src, env = (
        prompts_csv(tmp_path / "a.csv", 20),
        {"PLAY_KEY": play.key, "REAL_KEY": real.key, "OTHER_KEY": other.key},
    )
    mixed = _live_fleet(
        tmp_path / "mixed.toml", ("play", play, 600, "0.1", "openai"), ("real", real, 600, "0.2", "openai")
    )
    args = ["run", str(src), "-o", str(tmp_path / "o.parquet"), "--max-tokens", "16", "--fleet"]
    refused = run_cli([*args, str(mixed)], env=env)
    assert refused.exit_code == 2, refused.output
    assert (
        f"the fleet mixes batchllm's sandbox ({play.base.removeprefix('http://')}) with real servers"
        in refused.stderr
    )
    assert play.count() == real.count() == 0
    both = _live_fleet(
        tmp_path / "play.toml", ("play", play, 600, "0.1", "openai"), ("other", other, 600, "0.2", "openai")
    )
    result = run_cli([*args, str(both)], env=env)
    assert result.exit_code == 0 and PLAY in result.output, result.output


def test_a_batchs_real_answers_never_mix_with_the_sandboxs(sandbox_factory, tmp_path: Path) -> None:
    """import-batch results are a real server's: a served sandbox may not answer the rest of
    that output, and they may not be imported into an output the sandbox answered."""
    sandbox, real = sandbox_factory(marked=True), sandbox_factory()
    requests, results, errors = tmp_path / "req.jsonl", tmp_path / "res.jsonl", tmp_path / "err.jsonl"
    assert run_cli(["export-batch", *JOB, "-o", str(requests)]).exit_code == 0
    answer_batch(real, requests, results, errors, missing=frozenset({3, 7}))

    def live(out: Path, box) -> Result:
        return run_cli(["run", *JOB, "-o", str(out), "--rpm", "0", *LIVE_PRICES], env=box.openai_env())

    out = tmp_path / "imported.parquet"
    imported = run_cli(["import-batch", str(results), str(errors), *JOB, "-o", str(out), *BATCH_PRICES])
    assert imported.exit_code == 0, imported.output
    sent = sandbox.count()
    refused = live(out, sandbox)
    assert refused.exit_code == 2, refused.output
    assert "imported.parquet holds 198 answered rows from a real server" in refused.stderr
    assert sandbox.count() == sent  # nothing sent
    assert PLAY not in run_cli(["status", str(out)]).output
    rest = live(out, real)  # the real server answers the two left
    assert rest.exit_code == 0 and "2 to send (198 already done)" in rest.output, rest.output

    # Imported under other settings, every reply is refused as changed, no row answered, the
    # replies' cost counted in the output's: still a real server's money.
    changed = tmp_path / "changed.parquet"
    other = ["--max-tokens", "32"]
    imported = run_cli(
        ["import-batch", str(results), str(errors), *JOB, *other, "-o", str(changed), *BATCH_PRICES]
    )
    assert imported.exit_code == 0 and "differ" in imported.output, imported.output
    refused = run_cli(
        ["run", *JOB, *other, "-o", str(changed), "--rpm", "0", *LIVE_PRICES], env=sandbox.openai_env()
    )
    assert refused.exit_code == 2, refused.output
    assert "changed.parquet holds replies paid for from a real server" in refused.stderr
    assert sandbox.count() == sent

    play_out = tmp_path / "play.parquet"
    assert live(play_out, sandbox).exit_code == 0
    into_play = run_cli(["import-batch", str(results), str(errors), *JOB, "-o", str(play_out), *BATCH_PRICES])
    assert into_play.exit_code == 2, into_play.output
    assert "play.parquet holds 200 answered rows from batchllm's sandbox" in into_play.stderr
    assert "Traceback" not in into_play.output
