"""`batchllm sandbox`: serve the emulator (or a fleet of them, sandbox/fleet.py) until stopped."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from . import CONTEXT, cli, fail, run_async


@cli.command(
    "sandbox",
    context_settings=CONTEXT,
    epilog="""Example:

  batchllm sandbox --port 8787 --api-key test-key --latency 0.2 --rate-limit 20

  DATAOORTS_ENDPOINT=http://127.0.0.1:8787/api/v1 DATAOORTS_API_KEY=test-key batchllm run sample_data/reviews.csv -o out/r.parquet --template 'Classify: {review}'

  OPENAI_API_KEY=test-key batchllm run sample_data/reviews.csv -o out/r.parquet --template 'Classify: {review}' --provider openai --endpoint http://127.0.0.1:8787/v1 --input-price 0.31 --output-price 0.34""",
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback only is wise)."
)
@click.option(
    "--port", default=8787, show_default=True, type=click.IntRange(0, 65535), help="Port; 0 picks a free one."
)
@click.option(
    "--api-key",
    envvar="BATCHLLM_SANDBOX_KEY",
    help="Key clients must send.  [env: BATCHLLM_SANDBOX_KEY; default: random, printed]",
)
@click.option("--no-auth", "no_auth", is_flag=True, help="Accept any key or none, like a local server.")
@click.option(
    "--latency", default=0.0, type=click.FloatRange(0), show_default=True, help="Seconds before each reply."
)
@click.option(
    "--latency-per-token",
    default=0.0,
    type=click.FloatRange(0),
    show_default=True,
    help="Extra seconds per completion token.",
)
@click.option(
    "--jitter",
    default=0.0,
    type=click.FloatRange(0, 1),
    show_default=True,
    help="+/- fraction of the latency.",
)
@click.option(
    "--slots",
    default=0,
    type=click.IntRange(0),
    show_default=True,
    help="Requests computed at once, the rest queued in order, as a self-hosted server; 0 = no limit.",
)
@click.option(
    "--slot-seconds",
    default=0.0,
    type=click.FloatRange(0),
    show_default=True,
    help="Seconds each request holds its slot.",
)
@click.option(
    "--no-props",
    "slots_props",
    is_flag=True,
    default=True,
    flag_value=False,
    help="With --slots: no GET /props (llama.cpp states total_slots there).",
)
@click.option(
    "--reply-tokens",
    default="8-64",
    show_default=True,
    help="Natural reply length range in tokens (cut at max_tokens).",
)
@click.option(
    "--rate-limit",
    default=0.0,
    type=click.FloatRange(0),
    show_default=True,
    help="Requests/second before 429s; 0 = none.",
)
@click.option(
    "--rate-burst",
    default=2,
    type=click.IntRange(1),
    show_default=True,
    help="Requests allowed back to back under --rate-limit.",
)
@click.option(
    "--throttle-first",
    default=0,
    type=click.IntRange(0),
    show_default=True,
    help="Answer the first N requests 429.",
)
@click.option(
    "--throttle-ms",
    default=1000,
    type=click.IntRange(0),
    show_default=True,
    help="The wait those 429s ask for, in ms.",
)
@click.option(
    "--quota",
    default=0,
    type=click.IntRange(0),
    show_default=True,
    help="Successful requests before 429 quota used up; 0 = none.",
)
@click.option(
    "--fail-5xx", default=0.0, type=float, show_default=True, help="Share of requests answered 500/503."
)
@click.option("--fail-drop", default=0.0, type=float, show_default=True, help="Share of connections dropped.")
@click.option(
    "--fail-hang", default=0.0, type=float, show_default=True, help="Share of requests never answered."
)
@click.option(
    "--fail-garbled", default=0.0, type=float, show_default=True, help="Share of replies cut in half."
)
@click.option(
    "--fail-3040", default=0.0, type=float, show_default=True, help="Share answered 429 without a wait."
)
@click.option(
    "--no-usage", default=0.0, type=float, show_default=True, help="Share of replies without usage."
)
@click.option(
    "--extra-prompt-tokens",
    default=0,
    type=click.IntRange(0),
    show_default=True,
    help="Prompt tokens usage counts and bills beyond the messages' (a server's own template).",
)
@click.option(
    "--label-wrong", default=0.0, type=float, show_default=True, help="Labeling: share answered wrong."
)
@click.option(
    "--label-prose", default=0.0, type=float, show_default=True, help="Labeling: share wrapped in prose."
)
@click.option(
    "--label-out-of-set", default=0.0, type=float, show_default=True, help="Labeling: share outside the set."
)
@click.option(
    "--label-invalid-json", default=0.0, type=float, show_default=True, help="Labeling: share of broken JSON."
)
@click.option(
    "--label-truncated", default=0.0, type=float, show_default=True, help="Labeling: share cut at max_tokens."
)
@click.option(
    "--pack-missing", default=0.01, type=float, show_default=True, help="Packs: share of items left out."
)
@click.option(
    "--pack-prose",
    default=0.02,
    type=float,
    show_default=True,
    help="Packs: share of items wrapped in prose.",
)
@click.option(
    "--pack-fenced",
    default=0.05,
    type=float,
    show_default=True,
    help="Packs: share of replies in a fence or prose.",
)
@click.option(
    "--pack-broken",
    default=0.0,
    type=float,
    show_default=True,
    help="Packs: share of replies cut mid-object.",
)
@click.option(
    "--pack-decay",
    default=0.004,
    type=click.FloatRange(0),
    show_default=True,
    help="Packs: wrong answers added per other row in the pack (and half per position).",
)
@click.option(
    "--refuse-response-format",
    is_flag=True,
    help="OpenAI face: answer 400 to a request with response_format, as a server without JSON mode does.",
)
@click.option(
    "--overconfident",
    default=0.0,
    type=float,
    show_default=True,
    help="OpenAI face, asked for logprobs: the share of each answer's doubt taken away (0: calibrated).",
)
@click.option(
    "--refuse-logprobs",
    is_flag=True,
    help="OpenAI face: answer 400 to a request asking for logprobs, as a server that cannot return them.",
)
@click.option("--seed", type=int, help="Seed for fault injection (replies are deterministic anyway).")
@click.option(
    "--prompt-cache/--no-prompt-cache",
    default=True,
    show_default=True,
    help="OpenAI face: report a repeated prompt prefix (1,024 tokens and more) as cached, as OpenAI does.",
)
@click.option(
    "--served-model",
    help="The model OpenAI replies name, whatever was asked (a self-hosted server names the model "
    "it has loaded: llama.cpp its file).",
)
@click.option(
    "--keep-log/--no-keep-log",
    default=True,
    show_default=True,
    help="Keep the request log behind GET /_sandbox/log.",
)
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the bound port here once listening.",
)
@click.option(
    "--fleet",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Serve a fleet file's endpoints, each on its own port (from --port on) with its provider's face, "
    "its rpm as the rate limit and its prices as what it bills.",
)
@click.option(
    "--write-fleet",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --fleet: write the fleet as served here (loopback URLs, same names, limits and key_env).",
)
def sandbox_cmd(
    port_file: Path | None,
    host: str,
    port: int,
    reply_tokens: str,
    no_auth: bool,
    fleet: Path | None,
    write_fleet: Path | None,
    **options: Any,
) -> int:
    """Serve a local emulator of the Dataoorts API (/api/v1) and of OpenAI's (/v1) until interrupted."""
    from ..access import is_loopback
    from ..sandbox import SandboxConfig, serve
    from ..tokens import get_counter

    try:
        low, _, high = reply_tokens.partition("-")
        tokens = (int(low), int(high or low))
        if not 1 <= tokens[0] <= tokens[1]:
            raise ValueError
    except ValueError:
        return fail(f"--reply-tokens {reply_tokens!r} must be N or MIN-MAX, from 1 up")
    # click's FloatRange lets nan and inf through (no comparison with nan is false)
    endless = next((k for k, v in options.items() if isinstance(v, float) and not math.isfinite(v)), None)
    if endless is not None:
        return fail(f"--{endless.replace('_', '-')} must be a finite number, got {options[endless]}")
    rates = [
        k
        for k in options
        if (k.startswith(("fail_", "label_", "pack_")) or k in ("no_usage", "overconfident"))
        and not 0 <= options[k] <= 1
    ]
    if rates:
        return fail(f"--{rates[0].replace('_', '-')} must be a share from 0 to 1")
    for flag, path in (("--port-file", port_file), ("--write-fleet", write_fleet)):
        if path is not None and not path.parent.is_dir():  # said before listening, not as a bind error
            return fail(f"{flag} {path}: no folder {path.parent}")
    if write_fleet is not None and fleet is None:
        return fail("--write-fleet writes the served fleet's file: give --fleet too")
    if options["api_key"] is None:
        options.pop("api_key")
    config = SandboxConfig(reply_tokens=tokens, require_key=not no_auth, marked=True, **options)

    def ready(base: str) -> None:
        if port_file is not None:
            port_file.write_text(base.rsplit(":", 1)[1])
        key = "any" if no_auth else config.api_key
        click.echo(
            f"batchllm sandbox listening on {base} (dataoorts: {base}/api/v1, openai: {base}/v1; key: {key})",
            err=True,
        )
        if not is_loopback(host):  # the key is printed above: whoever reaches the port can use it
            click.echo(f"batchllm sandbox: {host} is not loopback: other machines can reach it", err=True)
        counter = get_counter()
        if not counter.exact:
            click.echo(f"batchllm sandbox: usage token counts are {counter.label}", err=True)

    try:
        if fleet is not None:
            run_async(_serve_fleet(fleet, write_fleet, config, host, port))
        else:
            run_async(serve(config, host, port, ready))
    except OSError as exc:
        return fail(f"cannot listen on {host}:{port}: {exc.strerror}")
    return 0


async def _serve_fleet(path: Path, out: Path | None, config: Any, host: str, port: int) -> None:
    from ..errors import JobError
    from ..fleet import fleet_toml, load_fleet
    from ..sandbox.fleet import SandboxFleet, serve_fleet

    endpoints = tuple(load_fleet(path))
    if port and port + len(endpoints) - 1 > 65535:  # one port an endpoint, from --port on
        raise JobError(
            f"--port {port}: {len(endpoints)} endpoints need ports up to 65535; give a lower one, or 0"
        )

    def ready(served: SandboxFleet) -> None:
        for e in served.endpoints:
            box = served.boxes[e.name].config
            limit = f"{box.rate_limit * 60:,.0f} requests/min" if box.rate_limit else "no rate limit"
            key = f"key: {e.key_env}={served.keys[e.key_env]}" if e.key_env else "no key"
            click.echo(
                f"batchllm sandbox: endpoint {e.name!r} at {e.endpoint} ({e.provider}, {limit}; {key})",
                err=True,
            )
        if out is not None:
            out.write_text(
                f"# {path} as `batchllm sandbox --fleet` serves it\n\n" + fleet_toml(served.endpoints)
            )
            click.echo(f"batchllm sandbox: wrote {out}", err=True)

    await serve_fleet(endpoints, config, host, port, ready)
