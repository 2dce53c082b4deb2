"""What a checkpoint holds besides the global state: the server optimizer's place.

Flower's FedAdam/FedYogi keep moments ``m_t``/``v_t`` and FedAvgM a momentum vector; the
client-level DP wrapper an adaptive clipping norm. They are saved each round with the
global state, restored on ``resume-from``, and the optimizer's own copy of the global
state is kept equal to the state that travels (:func:`sync_optimizer`), so a resumed run
continues exactly as an uninterrupted one (it also gets absolute round numbers, for
FedAdam/FedYogi's bias correction and FedAvgM's first-round reset).
"""

from __future__ import annotations

import numpy as np
from flwr.common import ndarrays_to_parameters
from flwr.server.strategy import Strategy

# server-optimizer state of Flower's FedAdam/FedYogi (m_t, v_t) and FedAvgM (momentum)
OPT_STATE = ("m_t", "v_t", "momentum_vector")


def aggregator_of(inner: Strategy) -> Strategy:
    """The aggregating strategy under any DP wrapper."""
    return getattr(inner, "strategy", inner)


def optimizer_state(inner: Strategy) -> dict[str, np.ndarray]:
    """Server-optimizer moments and the adaptive clipping norm, as named arrays."""
    norm = getattr(inner, "clipping_norm", None)
    out = {} if norm is None else {"dp_clipping_norm": np.asarray(float(norm))}
    for attr in OPT_STATE:
        value = getattr(aggregator_of(inner), attr, None)
        if value is not None:
            out.update({f"{attr}_{i:05d}": a for i, a in enumerate(value)})
    return out


def load_optimizer_state(inner: Strategy, arrays: dict[str, np.ndarray]) -> None:
    """Restore what :func:`optimizer_state` saved."""
    if "dp_clipping_norm" in arrays and hasattr(inner, "clipping_norm"):
        inner.clipping_norm = float(arrays["dp_clipping_norm"])
    for attr in OPT_STATE:
        keys = sorted(k for k in arrays if k.startswith(f"{attr}_"))
        if keys:
            setattr(aggregator_of(inner), attr, [arrays[k] for k in keys])


def sync_optimizer(inner: Strategy, arrays: list[np.ndarray]) -> None:
    """Make the optimizer's copy of the global state the state that travels (its dtype).

    FedOpt keeps ``current_weights`` and FedAvgM ``initial_parameters`` as the global
    state; without this, a state the base class cast (float64 -> float32) would differ from
    the optimizer's own copy, and a resumed run (which starts from the checkpoint) would
    drift from an uninterrupted one.
    """
    agg = aggregator_of(inner)
    if hasattr(agg, "current_weights"):
        agg.current_weights = [a.copy() for a in arrays]
    elif getattr(agg, "server_opt", False):  # FedAvgM with momentum / server lr
        agg.initial_parameters = ndarrays_to_parameters(arrays)


def checkpoint_arrays(glob: list[np.ndarray], state: dict[str, np.ndarray]
                      ) -> dict[str, np.ndarray]:
    """The arrays of one checkpoint: ``global_XXXXX`` + ``strategy_<name>``."""
    out = {f"global_{i:05d}": a for i, a in enumerate(glob)}
    out.update({f"strategy_{k}": v for k, v in state.items()})
    return out


def split_checkpoint(arrays: dict[str, np.ndarray]) -> tuple[list[np.ndarray],
                                                             dict[str, np.ndarray]]:
    """``(global arrays in order, strategy state)`` from a loaded checkpoint."""
    glob = [arrays[k] for k in sorted(k for k in arrays if k.startswith("global_"))]
    state = {k.removeprefix("strategy_"): v for k, v in arrays.items()
             if k.startswith("strategy_")}
    return glob, state
