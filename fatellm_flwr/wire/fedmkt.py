"""FedMKT's wire format (Fan et al. 2024, arXiv 2406.02224), imported by both sides.

Only logits and token ids travel, never weights. A top-k payload over the N public examples
(ragged: example ``i`` has ``T_i`` positions) is four arrays::

    values   float32 [sum T_i, k]  log-probabilities (0 where the index is -1)
    indices  int32   [sum T_i, k]  token ids in the receiver's vocabulary (-1 = none)
    lengths  int32   [N]           T_i
    ce       float32 [N]           the sender's cross-entropy on each example (up only)

Up (fit reply): the client's SLM top-k on its own tokenization, plus metric
``fedmkt-slm`` (the SLM's model reference, from which the server loads its tokenizer).
Down (evaluate instruction, after the server distilled): the LLM's top-k aligned to that
client's tokenization and vocabulary (``ce`` empty). Fit instructions carry no arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRIC_SLM = "fedmkt-slm"  # client -> server: its SLM (model reference; tokenizer source)
METRIC_SLM_VOCAB = "fedmkt-slm-vocab"  # client -> server: len(tokenizer), checked
KEY_SAVE_DIR = "fedmkt-save-dir"  # server -> client (last round): where to save the SLM adapter
KEY_TEACHER = "fedmkt-teacher"  # server -> client: the evaluate message carries LLM top-k

STATE_ADAPTER = "fatellm.fedmkt-slm-adapter"  # node's context.state: its SLM adapter
STATE_META = "fatellm.fedmkt-slm-meta"


def encode_topk(topk: Sequence[tuple[np.ndarray, np.ndarray]],
                ce: np.ndarray | None = None) -> list[np.ndarray]:
    """Per-example ``(values [T, k], indices [T, k])`` (+ CE ``[N]``) -> the four arrays."""
    k = max((v.shape[1] for v, _ in topk if v.ndim == 2), default=0)
    values = np.concatenate([np.asarray(v, np.float32).reshape(-1, k) for v, _ in topk]) \
        if topk else np.zeros((0, k), np.float32)
    indices = np.concatenate([np.asarray(i, np.int32).reshape(-1, k) for _, i in topk]) \
        if topk else np.zeros((0, k), np.int32)
    lengths = np.asarray([len(v) for v, _ in topk], dtype=np.int32)
    ce_arr = np.zeros(0, np.float32) if ce is None else np.asarray(ce, np.float32)
    return [values, indices, lengths, ce_arr]


def decode_topk(arrays: Sequence[np.ndarray]) -> tuple[list[tuple[np.ndarray, np.ndarray]],
                                                       np.ndarray]:
    """The four arrays -> (per-example ``(values, indices)``, CE); call
    :func:`topk_problem` first on anything received."""
    values, indices, lengths, ce = arrays
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out = [(values[a:b], indices[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return out, np.asarray(ce, dtype=np.float32)


def topk_problem(arrays: Sequence[np.ndarray], lengths: Sequence[int], k: int,
                 vocab_size: int, with_ce: bool, allow_unmapped: bool = False) -> str | None:
    """Why a top-k payload is unusable (wrong shapes, lengths, ids, NaN/Inf), or None."""
    if len(arrays) != 4:
        return f"sent {len(arrays)} arrays, expected 4 (values, indices, lengths, ce)"
    values, indices, got_lengths, ce = (np.asarray(a) for a in arrays)
    if got_lengths.ndim != 1 or list(got_lengths.tolist()) != list(lengths):
        return (f"sequence lengths {got_lengths.tolist()[:8]}... do not match the public set's "
                f"tokenization {list(lengths)[:8]}... (another tokenizer or public set?)")
    rows = int(sum(lengths))
    if values.shape != (rows, k) or indices.shape != (rows, k):
        return f"values {values.shape} / indices {indices.shape}, expected ({rows}, {k})"
    if values.dtype.kind != "f" or indices.dtype.kind not in "iu":
        return f"dtypes values {values.dtype}, indices {indices.dtype}: expected float, int"
    if not np.all(np.isfinite(values)):
        return "values contain NaN or Inf"
    if with_ce and (ce.shape != (len(lengths),) or not np.all(np.isfinite(ce))):
        return f"cross-entropies have shape {ce.shape} or contain NaN/Inf"
    low = -1 if allow_unmapped else 0
    if indices.size and (indices.min() < low or indices.max() >= vocab_size):
        return (f"token ids in [{indices.min()}, {indices.max()}], outside the vocabulary "
                f"[0, {vocab_size})")
    if values.size and values.max() > 1e-3:
        return f"values up to {values.max():.3g}: log-probabilities must be <= 0"
    return None


def payload_nbytes(arrays: Sequence[np.ndarray]) -> int:
    """Bytes of the arrays' data (the wire adds a ~128-byte .npy header per array)."""
    return int(sum(np.asarray(a).nbytes for a in arrays))
