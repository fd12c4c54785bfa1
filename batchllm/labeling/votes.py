"""Agreement across samples: the majority, how many agreed, and when more samples cannot matter."""

from __future__ import annotations

from collections import Counter


def majority(values: list[str]) -> tuple[str | None, float, dict[str, int]]:
    """(majority value or None on a tie or no values, agreement fraction, votes)."""
    votes = Counter(values)
    if not votes:
        return None, 0.0, {}
    ranked = votes.most_common()
    top, count = ranked[0]
    if len(ranked) > 1 and ranked[1][1] == count:
        return None, count / len(values), dict(votes)
    return top, count / len(values), dict(votes)


def settled(values: list[str], samples: int) -> bool:
    """With ``--adaptive``: can the remaining samples no longer change the majority?"""
    if not values:
        return False
    count = Counter(values).most_common(1)[0][1]
    return count > samples / 2
