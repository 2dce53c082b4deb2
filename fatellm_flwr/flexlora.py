"""FlexLoRA: federated LoRA with a different rank on every client (no Flower import).

Bai et al. 2024, "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
and Client Resources" (arXiv 2402.11505). Each client tunes LoRA at the rank its hardware
allows. The server cannot average ``A`` and ``B`` of different shapes, and averaging them
separately is not averaging the update anyway; it averages the full updates::

    dW = sum_c (n_c / N) * s_c * B_c A_c          (s_c = lora_alpha / r_c, peft's scaling)

and gives client ``c`` the best rank-``r_c`` approximation of ``dW`` (truncated SVD,
Eckart-Young): ``dW ~= U_r S_r V_r^T``, ``B = U_r S_r / s_c``, ``A = V_r^T``. The singular
values go into ``B`` and ``A`` keeps orthonormal rows, so even a zero ``dW`` (round 1)
leaves ``A`` non-zero and the adapter trainable.

``dW`` is never formed: with ``B_cat = [w_1 s_1 B_1 | ... ]`` and ``A_cat = [A_1; ...]``,
``dW = B_cat A_cat``; QR of both thin factors reduces the SVD to a ``sum r_c``-sized core.
The server keeps ``dW`` truncated to the largest rank it serves (``R``); since truncations
nest (the top ``r`` singular triplets of ``dW`` are those of its rank-``R`` truncation for
``r <= R``), every client still gets exactly the truncation of the full ``dW``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from .config import Config, ConfigError

_A = re.compile(r"^(?P<mod>.*)\.lora_A(?P<rest>\..*)$")


def client_rank(cfg: Config, node_config: Mapping, partition_id: int) -> int:
    """This client's LoRA rank: node config ``lora-r``, else ``lora-ranks`` by partition id,
    else ``lora-r``."""
    if node_config.get("lora-r") not in (None, ""):
        try:
            r = int(node_config["lora-r"])
        except (TypeError, ValueError):
            r = 0
        if r < 1:
            raise ConfigError(f"node config lora-r={node_config['lora-r']!r} must be an "
                              "integer >= 1")
        return r
    ranks = cfg.lora_rank_list
    if not ranks:
        return cfg.lora_r
    if not 0 <= partition_id < len(ranks):
        raise ConfigError(f"lora-ranks={cfg.lora_ranks!r} lists {len(ranks)} ranks but this "
                          f"client has partition-id {partition_id}: list one rank per "
                          "partition, or set the node config `lora-r`")
    return ranks[partition_id]


def lora_pairs(names: Sequence[str]) -> list[tuple[int, int]]:
    """``(index of lora_A, index of lora_B)`` of each adapted module in ``names``."""
    where = {n: i for i, n in enumerate(names)}
    pairs = []
    for i, n in enumerate(names):
        m = _A.match(n)
        if m:
            b = f"{m['mod']}.lora_B{m['rest']}"
            if b not in where:
                raise ValueError(f"{n!r} has no matching {b!r}")
            pairs.append((i, where[b]))
    return pairs


def _orthonormal_rows(a: np.ndarray, extra: int, seed: int = 0) -> np.ndarray:
    """``extra`` unit rows orthogonal to the rows of ``a`` and each other while the space
    allows (a rank above the layer's width gets random unit rows beyond that)."""
    rng = np.random.default_rng(seed)
    rows = [r for r in a]
    out: list[np.ndarray] = []
    while len(out) < extra:
        v = rng.normal(size=a.shape[1])
        if len(rows) + len(out) < a.shape[1]:
            for r in rows + out:
                v -= (v @ r) * r
        norm = np.linalg.norm(v)
        if norm > 1e-8:
            out.append(v / norm)
    return np.asarray(out).reshape(extra, a.shape[1])


def truncate(b_cat: np.ndarray, a_cat: np.ndarray, rank: int,
             scale: float) -> tuple[np.ndarray, np.ndarray]:
    """``(B [out, rank], A [rank, in])`` with ``scale * B A`` the best rank-``rank``
    approximation of ``b_cat @ a_cat``."""
    b_cat = np.asarray(b_cat, np.float64)
    a_cat = np.asarray(a_cat, np.float64)
    qb, rb = np.linalg.qr(b_cat)
    qa, ra = np.linalg.qr(a_cat.T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    k = min(rank, len(s))
    b = (qb @ u[:, :k]) * (s[:k] / scale)
    a = (qa @ vt[:k].T).T
    if k < rank:  # fewer directions than the rank: zero B columns, orthonormal A rows
        b = np.concatenate([b, np.zeros((b.shape[0], rank - k))], axis=1)
        a = np.concatenate([a, _orthonormal_rows(a, rank - k)], axis=0)
    return b.astype(np.float32), a.astype(np.float32)


def rank_of(arrays: Sequence[np.ndarray], pairs: Sequence[tuple[int, int]]) -> int:
    """The LoRA rank of a client's arrays (rows of its first ``lora_A``)."""
    return int(np.asarray(arrays[pairs[0][0]]).shape[0]) if pairs else 0


def aggregate(states: Sequence[Sequence[np.ndarray]], weights: Sequence[float],
              pairs: Sequence[tuple[int, int]], alpha: float, rank: int) -> list[np.ndarray]:
    """FlexLoRA aggregate of clients' LoRA arrays (each at its own rank), returned at
    ``rank``: ``B A = dW / (alpha / rank)`` truncated. Arrays outside LoRA pairs (same shape
    on every client) are averaged with the same weights."""
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    in_pair = {i for p in pairs for i in p}
    out: list[np.ndarray | None] = [None] * len(states[0])
    for ia, ib in pairs:
        b_cat = np.concatenate([wc * (alpha / s[ia].shape[0]) * np.asarray(s[ib], np.float64)
                                for wc, s in zip(w, states)], axis=1)
        a_cat = np.concatenate([np.asarray(s[ia], np.float64) for s in states], axis=0)
        out[ib], out[ia] = truncate(b_cat, a_cat, rank, alpha / rank)
    for i in range(len(out)):
        if i not in in_pair:
            out[i] = sum(wc * np.asarray(s[i], np.float64) for wc, s in zip(w, states)) \
                .astype(np.float32)
    return out  # type: ignore[return-value]


def redistribute(arrays: Sequence[np.ndarray], pairs: Sequence[tuple[int, int]],
                 alpha: float, rank: int) -> list[np.ndarray]:
    """The global arrays (any rank) truncated to ``rank``; unchanged when already there."""
    if not pairs or rank_of(arrays, pairs) == rank:
        return [np.asarray(a) for a in arrays]
    return aggregate([arrays], [1.0], pairs, alpha, rank)


def product(arrays: Sequence[np.ndarray], pairs: Sequence[tuple[int, int]],
            alpha: float) -> list[np.ndarray]:
    """``s * B A`` of every adapted module (for tests and diagnostics)."""
    out = []
    for ia, ib in pairs:
        r = np.asarray(arrays[ia]).shape[0]
        out.append((alpha / r) * np.asarray(arrays[ib], np.float64)
                   @ np.asarray(arrays[ia], np.float64))
    return out


def fit_to_model(model, arrays: Sequence[np.ndarray], alpha: float) -> list[np.ndarray]:
    """``arrays`` (global LoRA state at any rank) truncated to ``model``'s own LoRA rank;
    unchanged when the shapes already match."""
    import torch

    from .models import trainable_names

    params = [p for p in model.parameters() if p.requires_grad]
    if len(params) == len(arrays) and all(tuple(np.shape(a)) == tuple(p.shape)
                                          for a, p in zip(arrays, params)):
        return list(arrays)
    pairs = lora_pairs(trainable_names(model))
    if not pairs or len(params) != len(arrays):
        return list(arrays)  # not a LoRA state: let set_trainable_state report the mismatch
    with torch.no_grad():
        rank = int(params[pairs[0][0]].shape[0])
    return redistribute(arrays, pairs, alpha, rank)


def shape_problem(arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray],
                  pairs: Sequence[tuple[int, int]]) -> str | None:
    """Why a client's LoRA arrays can't be FlexLoRA-aggregated with ``reference`` (the
    global state): each module's ``A [r, in]``/``B [out, r]`` may use any one rank ``r``,
    everything else must match; no NaN/Inf."""
    if len(arrays) != len(reference):
        return f"sent {len(arrays)} arrays, expected {len(reference)}"
    in_pair = set()
    for ia, ib in pairs:
        in_pair.update((ia, ib))
        a, b = np.shape(arrays[ia]), np.shape(arrays[ib])
        ra, rb = np.shape(reference[ia]), np.shape(reference[ib])
        if len(a) != 2 or len(b) != 2 or a[1] != ra[1] or b[0] != rb[0] or a[0] != b[1] \
                or a[0] < 1:
            return f"LoRA pair {ia}/{ib} has shapes {a}/{b}, expected (r, {ra[1]})/({rb[0]}, r)"
    for i, (x, ref) in enumerate(zip(arrays, reference)):
        if i not in in_pair and np.shape(x) != np.shape(ref):
            return f"array {i} has shape {np.shape(x)}, expected {np.shape(ref)}"
        if not np.all(np.isfinite(x)):
            return f"array {i} contains NaN or Inf"
    return None
