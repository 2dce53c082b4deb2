"""FedKSeed client: zeroth-order full-parameter tuning along K shared seeds.

Each round the client (1) brings its copy of the causal LM to the current global model by
replaying per-seed scalar coefficients (it never receives weights), (2) runs ``local-steps``
MeZO-style ZO steps (:func:`fatellm_flwr.zo.zo_step`), each along one of the K candidate
seeds, picked uniformly in the first round and by probability-differentiated sampling
afterwards, and (3) returns only its ``(seed index, g)`` pairs. The wire protocol and the
aggregation are described in :mod:`fatellm_flwr.strategies.fedkseed`; the payload
encoders/decoders below are shared by both sides.

Where the rebuilt model lives between rounds:

- a process cache (:class:`ZoModel`, one per process, keyed by model + dtype + K + seed +
  which tensors are tuned). It records *exactly which coefficients have been applied* to
  its weights (``x = x0 - sum_s applied[s] z(s)``), including the client's own local steps,
  so moving to any global state costs one z generation per seed whose coefficient differs:
  the last round's seeds for a client of the simulation engine (whose actors live across
  rounds), also when several partitions share one process;
- the node's Flower ``context.state``: the global coefficient vector (K float64) and its
  version, so a node can apply the server's *difference* to it even in a fresh process
  (deployment spawns one per message), where the model itself is reloaded from disk and
  rebuilt from ``x0`` by one z generation per seed used so far (at most K);
- neither: when the server sent a difference from a version this node does not hold, the
  client replies ``fedkseed-need-full`` = 1 with no arrays; the server leaves it out of the
  round and sends it the full coefficient vector the next time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.client import NumPyClient

from ..config import Config
from ..metrics import evaluate_model
from ..models import cached_tokenizer, load_base_model
from ..train import batch_iterator, num_local_steps
from ..zo import (
    SeedHistory,
    apply_seed_updates,
    candidate_seeds,
    sample_seed_indices,
    seed_probabilities,
    z_for,
    zo_parameters,
    zo_step,
)
from .homo import client_datasets

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ protocol (fit/eval config)
KEY_RUN = "fedkseed-run"  # id of the server's run: node state of another run is ignored
KEY_VERSION = "fedkseed-version"  # version of the global coefficients the message leads to
KEY_BASE = "fedkseed-base"  # version the difference starts from (0 = from x0: the full vector)
KEY_DELTA = "fedkseed-delta"  # "none" | "sparse" ([indices, values]) | "dense" ([values])
KEY_PROBS = "fedkseed-probs"  # True: one more array, the uint8-quantised seed scores
METRIC_NEED_FULL = "fedkseed-need-full"  # client reply: "send me the full vector"

STATE_ARRAYS = "fatellm.fedkseed-global"
STATE_META = "fatellm.fedkseed-meta"
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


# ------------------------------------------------------------------ the rebuilt model
class ZoModel:
    """A causal LM whose tuned tensors are ``x0 - sum_s applied[s] z(s)``, tracked exactly.

    ``applied`` (float64, K) is what has been subtracted from the start weights ``x0`` along
    each candidate seed's direction. :meth:`move_to` reaches any other coefficient vector by
    generating each seed's z once per tensor with its coefficient difference (the cost of
    a replay = seeds that differ, never steps or rounds). :meth:`record_steps` books the
    client's own local steps, so the next :meth:`move_to` also undoes them in the same
    pass. With weight decay the local steps are not linear in z: they are booked with their
    exact decay factors and undone exactly (scale the 2-D+ tensors back by
    ``(1 - lr wd)^-T`` and add the decayed coefficients).
    """

    def __init__(self, model: torch.nn.Module, seeds: np.ndarray, exclude_embeddings: bool):
        self.model = model.eval()
        self.params = [p for _, p in zo_parameters(model, exclude_embeddings)]
        self.seeds = np.asarray(seeds, dtype=np.int64)
        self.applied = np.zeros(len(self.seeds), dtype=np.float64)
        self._pending: tuple[np.ndarray, np.ndarray, float] | None = None

    @property
    def k(self) -> int:
        return len(self.seeds)

    @torch.no_grad()
    def move_to(self, target: np.ndarray) -> int:
        """Bring the weights to ``x0 - sum_s target[s] z(s)``; returns the seeds replayed."""
        target = np.asarray(target, dtype=np.float64)
        if target.shape != self.applied.shape:
            raise ValueError(f"coefficients of shape {target.shape}, expected {self.applied.shape}")
        diff = target - self.applied
        if self._pending is None:
            support = np.flatnonzero(diff)
            apply_seed_updates(self.params, {int(self.seeds[i]): float(diff[i])
                                             for i in support})
        else:
            u_matrix, u_vector, scale = self._pending
            c_matrix, c_vector = diff - scale * u_matrix, diff - u_vector
            support = np.flatnonzero((c_matrix != 0) | (c_vector != 0))
            self._apply_split(support, c_matrix, c_vector, scale)
        self.applied = target.copy()
        self._pending = None
        return int(support.size)

    def _apply_split(self, support: np.ndarray, c_matrix: np.ndarray, c_vector: np.ndarray,
                     scale: float) -> None:
        """``p <- scale p - sum c z`` on 2-D+ tensors, ``p <- p - sum c z`` on the others."""
        order = support[np.argsort(self.seeds[support], kind="stable")]
        for i, p in enumerate(self.params):
            matrix = p.ndim >= 2
            coeffs = c_matrix if matrix else c_vector
            acc_dtype = torch.promote_types(p.dtype, torch.float32)
            delta = torch.zeros(p.shape, dtype=acc_dtype)
            for j in order:
                if coeffs[j] != 0.0:
                    delta.add_(z_for(p.shape, int(self.seeds[j]), i).to(acc_dtype),
                               alpha=float(coeffs[j]))
            new = p.to(acc_dtype) * (scale if matrix else 1.0) - delta.to(p.device)
            p.copy_(new)

    def record_steps(self, indices: Sequence[int], gs: Sequence[float], lr: float,
                     weight_decay: float = 0.0) -> None:
        """Book local ZO steps that were applied in place (in order, skipped ones left out)."""
        idx = np.asarray(indices, dtype=np.int64)
        g = np.asarray(gs, dtype=np.float64)
        if self._pending is not None:
            raise RuntimeError("local steps already booked: call move_to() first")
        if weight_decay == 0.0:
            np.add.at(self.applied, idx, lr * g)
            return
        decay = 1.0 - lr * weight_decay
        after = decay ** np.arange(len(idx) - 1, -1, -1, dtype=np.float64)  # decays after step j
        u_matrix = np.zeros(self.k)
        u_vector = np.zeros(self.k)
        np.add.at(u_matrix, idx, lr * g * after)
        np.add.at(u_vector, idx, lr * g)
        self._pending = (u_matrix, u_vector, decay ** -float(len(idx)))


_MODELS: dict[tuple, ZoModel] = {}
_NODE_FALLBACK: dict[int, tuple[str, int, np.ndarray]] = {}


def model_key(cfg: Config) -> tuple:
    return (cfg.model, cfg.gguf_file, cfg.dtype, cfg.zo_num_seeds, cfg.seed,
            cfg.zo_exclude_embeddings)


def process_model(cfg: Config) -> ZoModel:
    """This process's rebuilt model for ``cfg`` (loaded from ``cfg.model`` on first use)."""
    key = model_key(cfg)
    if key not in _MODELS:
        _MODELS.clear()  # one model per process
        model = load_base_model(cfg.model, cfg.gguf_file, "none", cfg.dtype)
        _MODELS[key] = ZoModel(model, candidate_seeds(cfg.zo_num_seeds, cfg.seed),
                               cfg.zo_exclude_embeddings)
    return _MODELS[key]


def clear_model_cache() -> None:
    _MODELS.clear()
    _NODE_FALLBACK.clear()


# ------------------------------------------------------------------ the client
class FedKSeedClient(NumPyClient):
    """Rebuilds the global model from seed coefficients, takes ZO steps, returns (seed, g)."""

    def __init__(self, cfg: Config, partition_id: int, num_partitions: int,
                 context: Context | None = None):
        self.cfg = cfg
        self.context = context
        self.partition_id = partition_id
        self.tokenizer = cached_tokenizer(cfg.model, cfg.gguf_file)
        self.task_data, self.train, self.val_raw, self.val = client_datasets(
            cfg, self.tokenizer, partition_id, num_partitions)
        self.k = cfg.zo_num_seeds

    # ------------------------------------------------------------------ node state
    def _load_node(self, run: str) -> tuple[int, np.ndarray] | None:
        if self.context is None:
            got = _NODE_FALLBACK.get(self.partition_id)
            if got is None or got[0] != run:
                return None
            return got[1], got[2]
        meta = self.context.state.config_records.get(STATE_META)
        if meta is None or str(meta["run"]) != run:
            return None
        coeffs = self.context.state.array_records[STATE_ARRAYS]["coeffs"].numpy()
        return int(meta["version"]), np.asarray(coeffs, dtype=np.float64)

    def _save_node(self, run: str, version: int, coeffs: np.ndarray) -> None:
        if self.context is None:
            _NODE_FALLBACK[self.partition_id] = (run, version, coeffs.copy())
            return
        self.context.state.array_records[STATE_ARRAYS] = ArrayRecord(
            {"coeffs": Array(np.ascontiguousarray(coeffs, dtype=np.float64))})
        self.context.state.config_records[STATE_META] = ConfigRecord(
            {"run": run, "version": int(version)})

    def rebuild(self, parameters, config) -> tuple[ZoModel, np.ndarray | None, dict] | None:
        """``(model at the message's global version, quantised seed scores, metrics)``, or
        None when the message is a difference from a version this node does not hold."""
        coeff_arrays, q = split_download(parameters, config)
        run, version, base = (str(config[KEY_RUN]), int(config[KEY_VERSION]),
                              int(config[KEY_BASE]))
        delta = decode_coefficients(coeff_arrays, str(config[KEY_DELTA]), self.k)
        node = self._load_node(run) if base > 0 else None
        if base == 0:
            target = delta
        elif node is not None and node[0] == version:
            target = node[1]  # rebuilt it already (a round whose reply the server missed)
        elif node is not None and node[0] == base:
            target = node[1] + delta
        else:
            log.warning("partition %d holds version %s of run %s, the server sent a "
                        "difference from version %d: asking for the full vector",
                        self.partition_id, None if node is None else node[0], run, base)
            return None
        t0 = time.perf_counter()
        zm = process_model(self.cfg)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            replayed = zm.move_to(target)
        except BaseException:
            _MODELS.clear()
            raise
        metrics = {"zo_replay_seeds": float(replayed),
                   "zo_replay_s": time.perf_counter() - t0, "zo_model_load_s": t_load,
                   "zo_full_rebuild": float(base == 0 and version > 0)}
        self._save_node(run, version, target)
        return zm, q, metrics

    # ------------------------------------------------------------------ Flower API
    def get_parameters(self, config) -> list[np.ndarray]:
        return []  # the server starts from its own copy of the model

    def fit(self, parameters, config):
        if self.partition_id in self.cfg.failing_partitions:
            raise RuntimeError(f"injected failure of partition {self.partition_id} "
                               "(fail-partitions)")
        got = self.rebuild(parameters, config)
        if got is None:
            return [], 0, {METRIC_NEED_FULL: 1.0, "partition-id": self.partition_id}
        zm, q, metrics = got
        cfg = self.cfg
        server_round = int(config.get("server-round", 1))
        steps = num_local_steps(cfg, len(self.train))
        rng = np.random.default_rng([cfg.seed, server_round, self.partition_id])
        picks = sample_seed_indices(decode_probabilities(q, self.k), steps, rng)
        batches = batch_iterator(self.train, cfg.batch_size, self.tokenizer.pad_token_id,
                                 seed=cfg.seed + 1000 * server_round + self.partition_id)
        kept_idx: list[int] = []
        kept_g: list[float] = []
        losses: list[float] = []
        t0 = time.perf_counter()
        try:
            for pick in picks:
                micro = [next(batches) for _ in range(cfg.grad_accum)]
                pair: list[float] = []

                def loss_fn(micro=micro, pair=pair) -> torch.Tensor:
                    loss = sum(zm.model(**b).loss for b in micro) / len(micro)
                    pair.append(float(loss))
                    return loss

                g = zo_step(zm.params, loss_fn, int(zm.seeds[pick]), eps=cfg.zo_eps,
                            lr=cfg.zo_lr, weight_decay=cfg.zo_weight_decay,
                            grad_clip=cfg.zo_grad_clip)
                if pair:
                    losses.append(float(np.mean(pair)))
                if g is not None:
                    kept_idx.append(int(pick))
                    kept_g.append(g)
            zm.record_steps(kept_idx, kept_g, cfg.zo_lr, cfg.zo_weight_decay)
        except BaseException:
            _MODELS.clear()  # the cached weights hold unbooked steps
            raise
        metrics.update({
            "partition-id": self.partition_id, "local_steps": steps,
            "zo_steps": float(len(kept_idx)), "zo_skipped": float(steps - len(kept_idx)),
            "zo_train_s": time.perf_counter() - t0,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "zo_abs_g": float(np.mean(np.abs(kept_g))) if kept_g else 0.0,
            "train_examples": float(steps * cfg.batch_size * cfg.grad_accum)})
        return encode_upload(kept_idx, kept_g), len(self.train), metrics

    def evaluate(self, parameters, config):
        got = self.rebuild(parameters, config)
        if got is None:
            return float("nan"), 0, {METRIC_NEED_FULL: 1.0, "partition-id": self.partition_id}
        if len(self.val) == 0:
            return float("nan"), 0, {"partition-id": self.partition_id}
        metrics = evaluate_model(got[0].model, self.tokenizer, self.val_raw, self.val,
                                 self.task_data, self.cfg)
        loss = metrics.pop("loss")
        return float(loss), len(self.val), {**metrics, "partition-id": self.partition_id}
