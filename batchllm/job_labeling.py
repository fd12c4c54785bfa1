"""A labeling job's settings checked against the providers it goes to (the job's, or each fleet
endpoint's): ``--structured on`` only where ``response_format`` is taken, and ``--confidence``
resolved to logprobs, votes or off (labeling/confidence.py). Part of ``build_job`` (job.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from .errors import JobError
from .labeling.spec import Labeling
from .providers import Provider, get_provider


def check_structured_on(kwargs: Mapping[str, Any], provider: Provider, where: str) -> None:
    """``--structured on``: a labeling job, sent where ``response_format`` is taken."""
    if kwargs["labeling"] is None:
        raise JobError(f"{where} on: structured output goes with --labels, --labels-file or --json-schema")
    if "response_format" in (kwargs.get("extra_body") or {}):
        raise JobError(f"{where} on: the job's [extra_body] has a response_format of its own; drop one")
    fleet = kwargs.get("fleet")
    if fleet:  # its endpoints', not the job's provider (engine/router.py)
        names = [f"fleet endpoint {e.name!r} ({e.provider} API)" for e in fleet
                 if not get_provider(e.provider).takes_response_format]  # fmt: skip
        auto = "auto (which sends it to the endpoints that take it)"
    else:
        names = [] if provider.takes_response_format else [f"the {provider.name} API"]
        auto = "auto"
    if names:
        has = "have" if len(names) > 1 else "has"
        raise JobError(
            f"{where} on: {', '.join(names)} {has} no JSON mode (no response_format); use "
            f"--structured {auto} or off (replies are then read and re-asked as free text)"
        )


def confidence_mode(
    labeling: Labeling, provider: Provider, fleet: Any, where: Callable[[str], str]
) -> Labeling:
    """``--confidence`` resolved for the job's provider(s): auto is logprobs where every one returns
    them, else the votes of samples, else off (labeling/confidence.py)."""
    names = {provider.name, *(e.provider for e in fleet or ())}
    logprobs = all(get_provider(n).returns_logprobs for n in names)
    mode = labeling.confidence
    insisted = mode == "logprobs"
    if mode == "auto":
        mode = "logprobs" if logprobs else "votes" if labeling.samples > 1 else "off"
    elif mode == "logprobs" and not logprobs:
        missing = sorted(n for n in names if not get_provider(n).returns_logprobs)[0]
        raise JobError(
            f"{where('confidence')} logprobs: the {missing} API returns no logprobs; use --confidence "
            "votes with --samples 2 or more (the winning label's share of the votes), or off"
        )
    elif mode == "votes" and labeling.samples < 2:
        raise JobError(f"{where('confidence')} votes: needs --samples 2 or more")
    if labeling.vote_below is not None and mode != "logprobs":
        raise JobError(
            f"{where('vote_below')}: needs a first answer's confidence from logprobs (the openai "
            "provider, --confidence auto or logprobs)"
        )
    return dataclasses.replace(labeling, confidence=mode, logprobs_insisted=insisted)
