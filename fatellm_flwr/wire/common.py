"""Message keys and the array codec shared by every algorithm (server and client side).

Every list of model arrays that travels in Flower's legacy ``Parameters`` goes through
:func:`to_wire` (the server's :func:`encode_arrays`; the clients' returned state) and
:func:`decode_arrays`: the one place where a wire dtype (a cast of what travels) belongs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import RecordDict
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays

KEY_SERVER_ROUND = "server-round"  # absolute round number (a resumed run continues counting)
SEND_DELTA = "send-delta"  # server -> client: return trained - received (SecAgg+)
KEY_ADAPTIVE = "client-adaptive-clipping"  # server -> client: use Flower's adaptive clip mod
NODE_RECORD_PREFIX = "fatellm.node."  # records the server sends for a node's context.state
METRIC_SKIPPED = "skipped"  # client -> server: why this node had nothing to train on


WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}  # ArrayRecord rejects bfloat16
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def to_wire(arrays: Sequence[np.ndarray], wire_dtype: str = "float32") -> list[np.ndarray]:
    """Model arrays as they travel: THE place for the ``wire-dtype`` cast. Used by the
    server (:func:`encode_arrays`) and by the clients that return model state (homo,
    offsite); receivers cast back (:func:`from_wire`, then to their own dtypes).

    Only float32 arrays (weights, adapters, updates) are cast; other dtypes travel as they
    are (FedKSeed's float64 coefficient vectors must replay exactly; integer indices).
    float16 refuses a value it cannot hold (|x| > 65504) instead of sending inf.
    """
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype {wire_dtype!r}; allowed: {', '.join(WIRE_DTYPES)}")
    target = WIRE_DTYPES[wire_dtype]
    out = []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if a.dtype == np.float32 and target is not np.float32:
            peak = float(np.max(np.abs(a), initial=0.0))
            if peak > _FLOAT16_MAX:
                raise ValueError(f"wire-dtype={wire_dtype!r} cannot carry array {i} (|value| "
                                 f"up to {peak:.4g} > {_FLOAT16_MAX:g}); use "
                                 "wire-dtype='float32'")
            a = a.astype(target)
        out.append(a)
    return out


def from_wire(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Received arrays ready for computing: float16 back to float32 (aggregation never runs
    in the wire dtype); other dtypes untouched."""
    out = []
    for a in arrays:
        a = np.asarray(a)
        out.append(a.astype(np.float32) if a.dtype == np.float16 else a)
    return out


def encode_arrays(arrays: Sequence[np.ndarray], wire_dtype: str = "float32") -> Parameters:
    """Arrays -> Flower ``Parameters`` (what travels, through :func:`to_wire`)."""
    return ndarrays_to_parameters(to_wire(arrays, wire_dtype))


def decode_arrays(parameters: Parameters) -> list[np.ndarray]:
    """Flower ``Parameters`` -> arrays for computing (inverse of :func:`encode_arrays`; a
    float16 wire comes back as float32, :func:`from_wire`)."""
    return from_wire(parameters_to_ndarrays(parameters))


def parameters_nbytes(parameters: Parameters) -> int:
    """Bytes of the serialised tensors that travel."""
    return int(sum(len(t) for t in parameters.tensors))


METRIC_SECAGG_UP = "secagg-upload-bytes"  # client reply: bytes of its SecAgg+ masked vector


def move_node_records(content: RecordDict, state: RecordDict) -> list[str]:
    """Move the records named ``fatellm.node.*`` the server sent for this node from a
    message's ``content`` into the node's ``context.state``; returns their names."""
    moved = []
    for src, dst in ((content.array_records, state.array_records),
                     (content.config_records, state.config_records)):
        for name in [n for n in src if n.startswith(NODE_RECORD_PREFIX)]:
            dst[name] = src[name]
            del src[name]
            moved.append(name)
    return moved
