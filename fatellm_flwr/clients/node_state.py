"""What a node remembers between rounds, kept in its Flower ``context.state``.

Each message in a deployment starts a fresh ClientApp process, so anything a node must
remember lives in ``context.state`` (persisted per node by the SuperNode, and by the
simulation engine); a process-level dict serves callers that pass no context (unit tests).
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context

_DP_HISTORY_KEY = "fatellm.dp-history"
_DP_HISTORY_FALLBACK: dict[int, list] = {}


def load_dp_history(context: Context | None, partition_id: int) -> list:
    """This node's DP-SGD accounting history ``[(noise, sample_rate, steps), ...]``."""
    if context is None:
        return _DP_HISTORY_FALLBACK.get(partition_id, [])
    rec = context.state.config_records.get(_DP_HISTORY_KEY)
    return json.loads(str(rec["history"])) if rec is not None else []


def save_dp_history(context: Context | None, partition_id: int, history: list) -> None:
    """Store this node's DP-SGD accounting history (see :func:`load_dp_history`)."""
    if context is None:
        _DP_HISTORY_FALLBACK[partition_id] = list(history)
        return
    context.state.config_records[_DP_HISTORY_KEY] = ConfigRecord(
        {"history": json.dumps([list(h) for h in history])})
