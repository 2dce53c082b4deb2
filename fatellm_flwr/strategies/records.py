"""Per-round records: metrics gathered while a round runs, written when it is evaluated."""

from __future__ import annotations

import math
from logging import DEBUG, INFO
from typing import Any

from flwr.common import Scalar
from flwr.common.logger import log

from ..logging_setup import round_line
from ..outputs import RunDir

HEADLINE_KEYS = ("server_accuracy", "server_rouge-l", "server_loss")  # the summary's metrics


def weighted_mean_metrics(pairs: list[tuple[int, dict[str, Scalar]]]) -> dict[str, float]:
    """Example-weighted mean of every numeric metric reported by the clients.

    Privacy spent (``*epsilon``) is the worst case over clients, not a mean.
    """
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    worst: dict[str, float] = {}
    for n, metrics in pairs:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                if k.endswith("epsilon"):
                    worst[k] = max(worst.get(k, float("-inf")), float(v))
                    continue
                totals[k] = totals.get(k, 0.0) + n * float(v)
                weights[k] = weights.get(k, 0.0) + n
    return {**{k: totals[k] / weights[k] for k in totals if weights[k] > 0}, **worst}


def failed_nodes(instructed: set[str] | None, replied: set[str], failures: list) -> int:
    """How many sampled nodes failed, counted by node.

    ``instructed``: the nodes sent a fit instruction this round (None when unknown);
    ``replied``: the nodes whose reply arrived. Flower's failures are ``(proxy, FitRes)``
    pairs or bare exceptions; SecAgg+'s workflow records each failed node's error twice
    (and without its node id), so with ``instructed`` known every instructed node that did
    not reply counts once; otherwise failures are counted once per node or error object.
    """
    if instructed is not None:
        return len(instructed - replied)
    keys = set()
    for failure in failures:
        if isinstance(failure, tuple):
            keys.add(("node", str(failure[0].cid)))
        else:
            first = failure.args[0] if getattr(failure, "args", None) else failure
            keys.add(("error", id(first)))
    return len(keys)


class RoundRecords:
    """One flat record per round in the run folder: ``pending`` collects a round's values
    (client counts, fit metrics...) until :meth:`write` stores the record and logs it."""

    def __init__(self, run: RunDir):
        self.run = run
        self.pending: dict[int, dict[str, Any]] = {}

    def of(self, rnd: int) -> dict[str, Any]:
        """The pending values of round ``rnd`` (created on first use)."""
        return self.pending.setdefault(rnd, {})

    def write(self, rnd: int, values: dict[str, Any]) -> dict[str, Any]:
        """Store round ``rnd``'s record (pending values + ``values``) and log it."""
        record: dict[str, Any] = {"round": rnd, **self.pending.pop(rnd, {}), **values}
        self.run.add_record(record)
        log(INFO, "%s", round_line(record))  # one line; every value at DEBUG and in metrics.json
        shown = ", ".join(f"{k}={_short(v)}" for k, v in record.items() if k != "round")
        log(DEBUG, "[round %d] %s", rnd, shown)
        return record

    def add_to_written(self, rnd: int, values: dict[str, Any]) -> None:
        """Add ``values`` to round ``rnd``'s record if it was written already."""
        record = next((r for r in self.run.records if r["round"] == rnd), None)
        if record is not None:
            record.update(values)
            self.run.add_record(record)

    def headline(self) -> str:
        """``server_accuracy: 0.24 (round 0) -> 0.90 (round 3)`` for each server metric."""
        recs = self.run.records
        out = []
        for key in HEADLINE_KEYS:
            pts = [(r["round"], r[key]) for r in recs if key in r]
            if len(pts) >= 2:
                out.append(f"{key}: {pts[0][1]:.4f} (round {pts[0][0]}) -> {pts[-1][1]:.4f} "
                           f"(round {pts[-1][0]})")
        return "\n".join(out)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
