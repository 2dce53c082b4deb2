"""Zeroth-order (ZO) core of FedKSeed: seeds, perturbations, steps and replay.

FedKSeed (Qin et al. 2023, "Federated Full-Parameter Tuning of Billion-Sized Language Models
with Communication Cost under 18 Kilobytes", arXiv:2312.06353) tunes all parameters with the
two-point ZO estimator of MeZO (Malladi et al. 2023) restricted to K shared random seeds: a
local step is fully described by ``(seed, g)`` where ``g`` is a scalar, so clients exchange
scalars and anyone holding the start model can rebuild the result.

Pure torch/numpy (no Flower import). Conventions used throughout:

* ``params`` is the ordered list returned by :func:`zo_parameters` (``(name, tensor)`` pairs or
  bare tensors). The position of a tensor in that list is its ``param_index``; every party must
  use the same list (same model, same ``exclude_embeddings``).
* The direction of seed ``s`` on tensor ``i`` is :func:`z_for` ``(shape_i, s, i)``: it is never
  stored for the whole model, only regenerated one tensor at a time (MeZO-style memory).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np
import torch
from torch import nn

__all__ = [
    "SeedHistory",
    "apply_seed_updates",
    "candidate_seeds",
    "direction_seed",
    "replay_steps",
    "sample_seed_indices",
    "seed_probabilities",
    "z_for",
    "z_stream",
    "zo_parameters",
    "zo_step",
]

SEED_LIMIT = 2**32
"""Candidate seeds live in ``[0, 2**32)`` (the paper's range, and torch's effective CPU seed)."""

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN32 = 0x9E3779B9
_SALT32 = 0x5EED1E55  # keeps (seed 0, tensor 0) off torch.manual_seed(0)'s stream

ParamList = Sequence[torch.Tensor] | Sequence[tuple[str, torch.Tensor]]


# --------------------------------------------------------------------------- parameters


def zo_parameters(
    model: nn.Module, exclude_embeddings: bool = False
) -> list[tuple[str, nn.Parameter]]:
    """The tensors FedKSeed tunes, as ``(name, parameter)`` in a stable order.

    Order is ``model.named_parameters()`` order, which already deduplicates tied weights (a tied
    ``lm_head.weight`` is the embedding's Parameter object and appears once, under the
    embedding's name). Frozen tensors (``requires_grad=False``) are left out.

    With ``exclude_embeddings`` the input token embedding (``model.get_input_embeddings()``) is
    dropped; because exclusion is by Parameter identity, a *tied* output head goes with it while
    an untied ``lm_head`` stays. Positional embeddings (GPT-2 ``wpe``, OPT ``embed_positions``)
    are not input token embeddings and stay. Dropping the embedding matrix saves the largest
    z-generation cost on small models (vocab x hidden) at little quality cost.
    """
    excluded: set[int] = set()
    if exclude_embeddings:
        getter = getattr(model, "get_input_embeddings", None)
        if getter is None:
            raise TypeError(
                f"exclude_embeddings=True needs a model with get_input_embeddings(); "
                f"got {type(model).__name__}"
            )
        embeddings = getter()
        if embeddings is not None:
            excluded = {id(p) for p in embeddings.parameters()}
    return [
        (name, p)
        for name, p in model.named_parameters()
        if p.requires_grad and id(p) not in excluded
    ]


def _tensors(params: ParamList) -> list[torch.Tensor]:
    return [p if isinstance(p, torch.Tensor) else p[1] for p in params]


# --------------------------------------------------------------------------- seeds


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def candidate_seeds(k: int, master_seed: int) -> np.ndarray:
    """``k`` distinct seeds in ``[0, 2**32)``, a pure function of ``master_seed`` (int64 array).

    Built from a splitmix64 counter stream in Python integers, so it does not depend on the
    numpy/torch version (numpy's ``Generator`` streams are not guaranteed stable across
    versions); duplicates are skipped so all ``k`` candidates are usable directions.
    """
    if k <= 0 or k > SEED_LIMIT:
        raise ValueError(f"k must be in [1, 2**32], got {k}")
    seeds: dict[int, None] = {}
    counter = (int(master_seed) * 0xD1B54A32D192ED03) & _M64
    while len(seeds) < k:
        counter = (counter + 1) & _M64
        seeds.setdefault(_splitmix64(counter) >> 32, None)
    return np.fromiter(seeds, dtype=np.int64, count=k)


def direction_seed(seed: int, param_index: int) -> int:
    """The 32-bit torch generator seed for tensor ``param_index`` of direction ``seed``.

    torch's CPU generator (mt19937) only uses the low 32 bits of a seed, so the derived seed is
    32-bit by construction: ``fmix32((seed + param_index * 0x9E3779B9 + salt) mod 2**32)``
    (murmur3's bijective finaliser). For a fixed tensor, distinct seeds never collide; for a
    fixed seed, distinct tensors never collide. (A tensor of one seed may share its stream with
    a *different* tensor of another seed; that is harmless.)
    """
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    h = (seed + int(param_index) * _GOLDEN32 + _SALT32) & _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def z_for(shape: Sequence[int] | torch.Size, seed: int, param_index: int) -> torch.Tensor:
    """The standard-normal direction of ``seed`` for tensor ``param_index``: float32, on CPU.

    Cross-machine contract: ``torch.randn(shape, dtype=float32, generator=CPU generator seeded
    with direction_seed(seed, param_index))``, computed on CPU whatever the model's device, then
    cast to the parameter's device/dtype by the caller. The values are identical across
    processes, thread counts and devices for one torch version *and CPU kernel family*: torch's
    vectorised float32 normal kernel (AVX2/AVX512 on x86) rounds differently (up to ~2e-6) from
    the generic one (``ATEN_CPU_CAPABILITY=default``, ARM), so a mixed x86/ARM federation
    agrees to ~1e-6, not bit for bit. Tensors under 16 elements go through torch's scalar float64
    path, which does not depend on the kernel family.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(direction_seed(seed, param_index))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
PARALLEL_MIN_NUMEL = 1 << 20
"""Below this many elements in all, :func:`z_stream` draws on the calling thread."""
PARALLEL_Z = True
"""Draw z ahead on worker threads (:func:`z_stream`); False = on the calling thread, as
before (kept for the side-by-side in ``benchmarks/zo_speed.py``)."""

ZJob = tuple[Sequence[int] | torch.Size, int, int]
"""``(shape, seed, param_index)``: the arguments of one :func:`z_for` call."""


def z_stream(jobs: Sequence[ZJob]) -> Iterator[torch.Tensor]:
    """``z_for(*job)`` for every job, in order, drawn ahead on worker threads.

    torch's CPU generator draws one tensor's normals serially (mt19937), so regenerating z for
    a model is single-threaded however many cores there are. The jobs' streams are independent,
    so up to ``2 x torch.get_num_threads()`` of them are drawn concurrently while the caller
    uses the earlier ones. Workers only run the generator; every arithmetic operation on the
    weights stays on the calling thread in the same order (bit-identical results, no nested
    intra-op thread teams). Jobs under :data:`PARALLEL_MIN_NUMEL` elements in all are drawn
    on the calling thread.
    """
    workers = min(torch.get_num_threads(), len(jobs)) if PARALLEL_Z else 1
    if workers <= 1 or sum(math.prod(shape) for shape, _, _ in jobs) < PARALLEL_MIN_NUMEL:
        for job in jobs:
            yield z_for(*job)
        return
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="zo-z")
    draw = z_for  # resolved once, so a patched z_for (tests) is used throughout
    todo = iter(jobs)
    pending = deque(pool.submit(draw, *job) for job in islice(todo, 2 * workers))
    try:
        while pending:
            z = pending.popleft().result()
            job = next(todo, None)
            if job is not None:
                pending.append(pool.submit(draw, *job))
            yield z
    finally:
        for future in pending:
            future.cancel()


def _zs_like(tensors: Sequence[torch.Tensor], seed: int) -> Iterator[torch.Tensor]:
    """Seed ``seed``'s z for every tensor, in order, on each tensor's device and dtype."""
    jobs = [(p.shape, seed, i) for i, p in enumerate(tensors)]
    for p, z in zip(tensors, z_stream(jobs)):
        yield z.to(device=p.device, dtype=p.dtype)


# --------------------------------------------------------------------------- probabilities


def seed_probabilities(clipped_abs_sum: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The paper's probability-differentiated seed sampling (FATE: ``probability_from_amps``).

    Score per seed = mean of ``|clamp(g, -c, c)|`` over its history (passed as the running sum
    of clipped magnitudes and the count), min-max normalised to ``[0, 1]``, then softmax.
    Seeds with no history score 0 (before normalisation), i.e. they get the lowest probability,
    like the weakest-signal seeds (FATE's own code would produce NaN there). When all scores are
    equal (e.g. no history at all, round 1) the result is uniform.
    """
    counts = np.asarray(counts)
    sums = np.asarray(clipped_abs_sum, dtype=np.float64)
    score = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    span = score.max() - score.min()
    norm = (score - score.min()) / span if span > 0 else np.zeros_like(score)
    e = np.exp(norm - norm.max())
    return e / e.sum()


def sample_seed_indices(probs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` seed indices (with replacement) from ``probs``; one per local step."""
    return rng.choice(len(probs), size=n, replace=True, p=probs)


class SeedHistory:
    """O(K) record of every scalar gradient seen per candidate seed.

    Keeps, per seed index: the sum of ``g`` (what the model update needs: the global update of
    seed ``i`` is ``lr * g_sum[i]`` up to client weighting), the count, and the sum of
    ``|clamp(g, -bias_loss_clip, bias_loss_clip)|`` (what sampling needs). Memory never grows
    with the number of steps.
    """

    def __init__(self, k: int, bias_loss_clip: float = 1000.0) -> None:
        self.k = int(k)
        self.bias_loss_clip = float(bias_loss_clip)
        self.g_sum = np.zeros(self.k, dtype=np.float64)
        self.abs_clipped_sum = np.zeros(self.k, dtype=np.float64)
        self.counts = np.zeros(self.k, dtype=np.int64)

    def update(self, indices: Sequence[int] | np.ndarray, gs: Sequence[float] | np.ndarray) -> None:
        """Add scalar gradients ``gs[j]`` observed for seed indices ``indices[j]`` (repeats ok)."""
        idx = np.asarray(indices, dtype=np.int64)
        g = np.asarray(gs, dtype=np.float64)
        if idx.shape != g.shape:
            raise ValueError(f"indices {idx.shape} and gs {g.shape} must have the same shape")
        if not np.all(np.isfinite(g)):
            raise ValueError("gs must be finite; drop skipped steps (g=None) before update()")
        if idx.size and (idx.min() < 0 or idx.max() >= self.k):
            raise ValueError(f"seed indices must be in [0, {self.k})")
        np.add.at(self.g_sum, idx, g)
        np.add.at(self.abs_clipped_sum, idx, np.abs(np.clip(g, -self.bias_loss_clip,
                                                            self.bias_loss_clip)))
        np.add.at(self.counts, idx, 1)

    def probabilities(self) -> np.ndarray:
        """Sampling distribution over the K seeds (see :func:`seed_probabilities`)."""
        return seed_probabilities(self.abs_clipped_sum, self.counts)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """State as named numpy arrays (for checkpoints or the wire)."""
        return {
            "g_sum": self.g_sum.copy(),
            "abs_clipped_sum": self.abs_clipped_sum.copy(),
            "counts": self.counts.copy(),
            "bias_loss_clip": np.asarray(self.bias_loss_clip, dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> SeedHistory:
        """Inverse of :meth:`to_arrays`."""
        hist = cls(len(arrays["counts"]), float(arrays["bias_loss_clip"]))
        hist.g_sum[:] = arrays["g_sum"]
        hist.abs_clipped_sum[:] = arrays["abs_clipped_sum"]
        hist.counts[:] = arrays["counts"]
        return hist


# --------------------------------------------------------------------------- steps


def _add_z(tensors: list[torch.Tensor], seed: int, scale: float,
           zs: list[torch.Tensor] | None) -> None:
    for p, z in zip(tensors, _zs_like(tensors, seed) if zs is None else zs):
        p.add_(z, alpha=scale)


def _restore_and_update(
    p: torch.Tensor, z: torch.Tensor, eps: float, g: float | None, lr: float, weight_decay: float
) -> None:
    """Last phase of a step on one tensor; shared by :func:`zo_step` and :func:`replay_steps`
    so both perform the identical float operations (bit-exact replay)."""
    if eps:
        p.add_(z, alpha=eps)
    if g is None:
        return
    if weight_decay and p.ndim >= 2:
        p.mul_(1.0 - lr * weight_decay)
    p.add_(z, alpha=-lr * g)


@torch.no_grad()
def zo_step(
    params: ParamList,
    loss_fn: Callable[[], torch.Tensor],
    seed: int,
    eps: float = 5e-4,
    lr: float = 1e-5,
    weight_decay: float = 0.0,
    grad_clip: float = 0.0,
    cache_z: bool = False,
) -> float | None:
    """One in-place FedKSeed/MeZO step along the direction of ``seed``; returns ``g`` or None.

    ``g = (L(x + eps z) - L(x - eps z)) / (2 eps)`` and ``x <- x - lr (g z + wd x)``, with weight
    decay only on tensors of 2+ dims (biases and norm scales are not decayed, as in FATE/MeZO's
    parameter grouping). Memory: by default z is regenerated tensor by tensor from the seed for
    each phase (+eps, -2 eps, then +eps fused with the update), never held for the whole model
    (MeZO's inference-level memory). ``cache_z=True`` generates it once and holds it for the
    step: one z generation per step instead of three, for one extra copy of the tuned tensors
    on their device. The float operations are the same either way (bit-identical results).

    ``loss_fn`` is called twice under ``torch.no_grad``; it must be deterministic (eval mode, no
    dropout), else the difference measures noise. If ``grad_clip > 0`` and ``|g| > grad_clip``,
    or ``g`` is not finite, the step is skipped: parameters are restored and None is returned.
    Restoration is exact in real arithmetic; in floating point the +eps/-2eps/+eps round trip
    leaves rounding residue (~1 ulp per tensor element per step), which :func:`replay_steps`
    with the same ``eps`` reproduces bit for bit.
    """
    tensors = _tensors(params)
    zs = list(_zs_like(tensors, seed)) if cache_z else None
    _add_z(tensors, seed, eps, zs)
    loss_pos = float(loss_fn())
    _add_z(tensors, seed, -2.0 * eps, zs)
    loss_neg = float(loss_fn())
    g: float | None = (loss_pos - loss_neg) / (2.0 * eps)
    if not math.isfinite(g) or (grad_clip > 0 and abs(g) > grad_clip):
        g = None
    for p, z in zip(tensors, _zs_like(tensors, seed) if zs is None else zs):
        _restore_and_update(p, z, eps, g, lr, weight_decay)
    return g


@torch.no_grad()
def replay_steps(
    params: ParamList,
    steps: Sequence[tuple[int, float | None]],
    lr: float,
    weight_decay: float = 0.0,
    eps: float = 0.0,
) -> None:
    """Re-apply a client's local steps ``[(seed, g), ...]`` in order, in place.

    With ``eps`` equal to the one used in :func:`zo_step` (and ``(seed, None)`` entries for
    skipped steps), the result is bit-identical to the client's model, because the same float
    operations are replayed (perturbation round trip included) with z generated once per step.
    With ``eps=0`` only the updates are applied: the same model up to rounding (allclose ~1e-6).
    Sequential by design (weight decay makes steps non-commutative); for wd=0 and speed, use
    :func:`apply_seed_updates`.
    """
    tensors = _tensors(params)
    for seed, g in steps:
        for p, z in zip(tensors, _zs_like(tensors, seed)):
            if eps:
                p.add_(z, alpha=eps)
                p.add_(z, alpha=-2.0 * eps)
            _restore_and_update(p, z, eps, None if g is None else float(g), lr, weight_decay)


@torch.no_grad()
def apply_seed_updates(params: ParamList, updates: Mapping[int, float]) -> None:
    """In place ``x <- x - sum_s coeff_s * z(s)``: the fast replay of many steps (no weight decay).

    ``coeff_s`` is typically ``lr * (accumulated g of seed s)``. Each seed's z is generated once
    per tensor, so cost is (#distinct seeds) x (one z generation), independent of step count.
    Seeds are applied in sorted order (result independent of the mapping's order), summed into
    a float32 (float64 for float64 params) CPU buffer per tensor and added once, which keeps
    small updates from vanishing in bf16/fp16 weights and moves one tensor per parameter to the
    device. Zero coefficients are skipped.
    """
    tensors = _tensors(params)
    items = sorted((int(s), float(c)) for s, c in updates.items() if float(c) != 0.0)
    if not items:
        return
    stream = z_stream([(p.shape, seed, i) for i, p in enumerate(tensors) for seed, _ in items])
    for p in tensors:
        acc_dtype = torch.promote_types(p.dtype, torch.float32)
        delta = next(stream).to(acc_dtype).mul_(items[0][1])
        for _, coeff in items[1:]:
            delta.add_(next(stream), alpha=coeff)
        if p.dtype == acc_dtype:
            p.sub_(delta.to(p.device))
        else:  # low precision: one rounding of the summed update
            p.copy_(p.to(acc_dtype) - delta.to(p.device))
