"""FedKSeed's wire format (Qin et al. 2023, arXiv 2312.06353), imported by both sides.

Up: ``[seed indices int32, scalar gradients float32]``; down: a coefficient difference
(sparse or dense float32) + the uint8-quantised seed scores, described by the config keys
below. The protocol is explained in :mod:`fatellm_flwr.strategies.fedkseed`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..zo import SeedHistory, seed_probabilities

# ------------------------------------------------------------------ protocol (fit/eval config)
KEY_RUN = "fedkseed-run"  # id of the server's run: node state of another run is ignored
KEY_VERSION = "fedkseed-version"  # version of the global coefficients the message leads to
KEY_BASE = "fedkseed-base"  # version the difference starts from (0 = from x0: the full vector)
KEY_DELTA = "fedkseed-delta"  # "none" | "sparse" ([indices, values]) | "dense" ([values])
KEY_PROBS = "fedkseed-probs"  # True: one more array, the uint8-quantised seed scores
METRIC_NEED_FULL = "fedkseed-need-full"  # client reply: "send me the full vector"

NPY_HEADER = 128  # bytes np.save puts before a 1-D array (what Flower's tensors carry)

# ------------------------------------------------------------------ payloads (both sides)
def encode_upload(indices: Sequence[int], gs: Sequence[float]) -> list[np.ndarray]:
    """The client's fit result: ``[seed indices (int32), scalar gradients (float32)]``."""
    return [np.asarray(indices, dtype=np.int32).reshape(-1),
            np.asarray(gs, dtype=np.float32).reshape(-1)]


def upload_problem(arrays: Sequence[np.ndarray], k: int, max_steps: int = 0,
                   grad_clip: float = 0.0) -> str | None:
    """Why a fit result is not a valid FedKSeed upload, or None."""
    if len(arrays) != 2:
        return f"sent {len(arrays)} arrays, expected 2 (seed indices, scalar gradients)"
    idx, g = (np.asarray(a) for a in arrays)
    if idx.ndim != 1 or g.ndim != 1:
        return f"arrays must be 1-D, got shapes {idx.shape} and {g.shape}"
    if len(idx) != len(g):
        return f"{len(idx)} seed indices but {len(g)} scalar gradients"
    if not np.issubdtype(idx.dtype, np.integer):
        return f"seed indices have dtype {idx.dtype}, expected an integer type"
    if not np.issubdtype(g.dtype, np.floating):
        return f"scalar gradients have dtype {g.dtype}, expected a float type"
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= k):
        return f"seed indices must be in [0, {k}), got [{int(idx.min())}, {int(idx.max())}]"
    if not np.all(np.isfinite(g)):
        return "scalar gradients contain NaN or Inf"
    if max_steps and len(idx) > max_steps:
        return f"sent {len(idx)} steps, more than local-steps={max_steps}"
    if grad_clip > 0 and g.size and float(np.abs(g).max()) > grad_clip:
        return f"a scalar gradient exceeds zo-grad-clip={grad_clip}"
    return None


def encode_coefficients(diff: np.ndarray) -> tuple[list[np.ndarray], str]:
    """A coefficient difference (dense, K) as the cheaper of sparse or dense float32 arrays.

    Sparse: ``[indices (uint16 when K <= 65536, else int32), values (float32)]``;
    dense: ``[values (float32, K)]``; nothing when the difference is zero.
    """
    diff = np.asarray(diff, dtype=np.float64)
    k = diff.size
    support = np.flatnonzero(diff)
    if support.size == 0:
        return [], "none"
    idx_dtype = np.uint16 if k <= 65536 else np.int32
    sparse = support.size * (np.dtype(idx_dtype).itemsize + 4) + 2 * NPY_HEADER
    if sparse <= 4 * k + NPY_HEADER:
        return [support.astype(idx_dtype), diff[support].astype(np.float32)], "sparse"
    return [diff.astype(np.float32)], "dense"


def decode_coefficients(arrays: Sequence[np.ndarray], mode: str, k: int) -> np.ndarray:
    """Inverse of :func:`encode_coefficients`: a dense float64 vector of length ``k``."""
    out = np.zeros(k, dtype=np.float64)
    if mode == "none":
        return out
    if mode == "dense":
        (values,) = arrays
        if values.shape != (k,):
            raise ValueError(f"dense coefficients of shape {values.shape}, expected ({k},)")
        return out + values.astype(np.float64)
    if mode != "sparse":
        raise ValueError(f"{KEY_DELTA}={mode!r}; expected none, sparse or dense")
    idx, values = arrays
    idx = np.asarray(idx, dtype=np.int64)
    if idx.shape != values.shape or (idx.size and (idx.min() < 0 or idx.max() >= k)):
        raise ValueError(f"bad sparse coefficients: {idx.shape} indices, {values.shape} values")
    out[idx] = values.astype(np.float64)
    return out


def encode_probabilities(history: SeedHistory) -> np.ndarray | None:
    """The seed scores behind the sampling distribution, quantised to uint8 (K bytes).

    The paper's score is ``mean |clip(g)|`` per seed, min-max normalised to [0, 1], then
    softmax. We send ``q = round(255 * normalised score)``; the client's distribution is
    ``softmax(q / 255)``, within a factor ``exp(1/510)`` (0.2%) of the exact one per seed.
    None when all scores are equal (uniform, e.g. round 1): nothing needs to travel.
    """
    counts = history.counts
    score = np.divide(history.abs_clipped_sum, counts,
                      out=np.zeros_like(history.abs_clipped_sum), where=counts > 0)
    span = score.max() - score.min()
    if not span > 0:
        return None
    return np.rint(255.0 * (score - score.min()) / span).astype(np.uint8)


def decode_probabilities(q: np.ndarray | None, k: int) -> np.ndarray:
    """Sampling distribution from :func:`encode_probabilities` (uniform for None)."""
    if q is None:
        return np.full(k, 1.0 / k)
    if q.shape != (k,):
        raise ValueError(f"seed scores of shape {q.shape}, expected ({k},)")
    return seed_probabilities(q.astype(np.float64), np.ones(k, dtype=np.int64))


def split_download(arrays: Sequence[np.ndarray], config) -> tuple[list[np.ndarray],
                                                                   np.ndarray | None]:
    """``(coefficient arrays, quantised scores or None)`` of a fit/evaluate message."""
    arrays = list(arrays)
    q = arrays.pop() if bool(config.get(KEY_PROBS, False)) else None
    expected = {"none": 0, "dense": 1, "sparse": 2}.get(str(config.get(KEY_DELTA, "none")))
    if expected is None or len(arrays) != expected:
        raise ValueError(f"{len(arrays)} coefficient arrays for {KEY_DELTA}="
                         f"{config.get(KEY_DELTA)!r}")
    return arrays, q
