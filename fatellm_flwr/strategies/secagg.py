"""SecAgg+ (Bell et al. 2020) on the server side: what the strategy receives and counts.

Under Flower's ``SecAggPlusWorkflow`` every client's result carries the same dequantized
*sum* (float64) of the clients' updates, sent as deltas (``send-delta``); the masked
vectors that really travelled are not in the results, so each client reports their size
(``secagg-upload-bytes``, measured by its ``secagg_mod``).
"""

from __future__ import annotations

import numpy as np
from flwr.common import FitRes

from ..wire.common import METRIC_SECAGG_UP, parameters_nbytes


def keep_dtypes(arrays: list[np.ndarray], reference: list[np.ndarray]) -> list[np.ndarray]:
    """``arrays`` cast to the dtypes of ``reference`` (the global state's): SecAgg+'s
    float64 aggregate and FedAdam's float64 step must not change what travels."""
    return [np.asarray(a).astype(r.dtype, copy=False) for a, r in zip(arrays, reference)]


def from_delta(delta: list[np.ndarray], current: list[np.ndarray]) -> list[np.ndarray]:
    """The state a (summed) delta leads to, in the global state's dtypes."""
    return keep_dtypes([c + d for d, c in zip(delta, current)], current)


def upload_nbytes(res: FitRes) -> int:
    """Bytes a client really sent: its masked vector under SecAgg+, else its arrays."""
    sent = res.metrics.get(METRIC_SECAGG_UP)
    if isinstance(sent, (int, float)) and not isinstance(sent, bool):
        return int(sent)
    return parameters_nbytes(res.parameters)
