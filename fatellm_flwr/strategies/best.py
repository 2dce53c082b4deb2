"""The best round by a validation metric (``best-metric``): early stopping's selection.

Selecting the round on held-out *validation* data (the server's ``server-val-size``
examples, or the clients' aggregated evaluation) and reporting the *test* numbers of that
round keeps the test set unbiased (Prechelt 1998, "Early Stopping - But When?"). The best
round is found from the run's records, so a resumed run continues the same selection.
"""

from __future__ import annotations

import math
from typing import Any

BEST = "best"  # the run folder's copy of the best round's artefact
BEST_ROUND = "best_round"  # record key: the best round so far (by best-metric)


def minimised(metric: str) -> bool:
    """Losses and perplexities are minimised, everything else (accuracy, ROUGE) maximised."""
    return metric.endswith(("loss", "perplexity"))


def best_round(records: list[dict[str, Any]], metric: str,
               exclude: int | None = None) -> tuple[int, float] | None:
    """``(round, value)`` of the best finite ``metric`` over ``records`` (the earliest on a
    tie), ignoring round ``exclude``; None when no record has it."""
    points = [(r["round"], float(r[metric])) for r in records
              if r.get("round") != exclude and isinstance(r.get(metric), (int, float))
              and math.isfinite(r[metric])]
    if not points:
        return None
    sign = 1.0 if minimised(metric) else -1.0
    return min(points, key=lambda p: (sign * p[1], p[0]))


def improves(metric: str, value: float, best: tuple[int, float] | None) -> bool:
    """Whether ``value`` is strictly better than ``best``'s (always, when there is none)."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best[1] if minimised(metric) else value > best[1]
