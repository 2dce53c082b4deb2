"""FedKSeed client: zeroth-order full-parameter tuning along K shared seeds.

Each round the client (1) brings its copy of the causal LM to the current global model by
replaying per-seed scalar coefficients (it never receives weights), (2) runs ``local-steps``
MeZO-style ZO steps (:func:`fatellm_flwr.zo.zo_step`), each along one of the K candidate
seeds, picked uniformly in the first round and by probability-differentiated sampling
afterwards, and (3) returns only its ``(seed index, g)`` pairs. The wire protocol and the
aggregation are described in :mod:`fatellm_flwr.strategies.fedkseed`; the payload
encoders/decoders live in :mod:`fatellm_flwr.wire.fedkseed`.

Where the rebuilt model lives between rounds:

- a process cache (:class:`~fatellm_flwr.zo_model.ZoModel`, one per process, keyed by
  model + dtype + K + seed + which tensors are tuned). It records *exactly which
  coefficients have been applied* to its weights (``x = x0 - sum_s applied[s] z(s)``),
  including the client's own local steps, so moving to any global state costs one z
  generation per seed whose coefficient differs: the last round's seeds for a client of
  the simulation engine (whose actors live across rounds), also when several partitions
  share one process;
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

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.client import NumPyClient

from ..config import Config
from ..device import model_device, to_device
from ..metrics import evaluate_model
from ..models import cached_tokenizer, load_base_model
from ..train import batch_iterator, num_local_steps
from ..wire.common import KEY_SERVER_ROUND
from ..wire.fedkseed import (
    KEY_BASE,
    KEY_DELTA,
    KEY_RUN,
    KEY_VERSION,
    METRIC_NEED_FULL,
    decode_coefficients,
    decode_probabilities,
    encode_upload,
    split_download,
)
from ..zo import candidate_seeds, sample_seed_indices, zo_step
from ..zo_model import ZoModel
from .datasets import client_datasets

log = logging.getLogger(__name__)

STATE_ARRAYS = "fatellm.fedkseed-global"
STATE_META = "fatellm.fedkseed-meta"

_MODELS: dict[tuple, ZoModel] = {}
_NODE_FALLBACK: dict[int, tuple[str, int, np.ndarray]] = {}


def model_key(cfg: Config) -> tuple:
    return (cfg.model, cfg.gguf_file, cfg.dtype, cfg.zo_num_seeds, cfg.seed,
            cfg.zo_exclude_embeddings, cfg.device)


def process_model(cfg: Config) -> ZoModel:
    """This process's rebuilt model for ``cfg`` (loaded from ``cfg.model`` on first use)."""
    key = model_key(cfg)
    if key not in _MODELS:
        _MODELS.clear()  # one model per process
        model = load_base_model(cfg.model, cfg.gguf_file, "none", cfg.dtype, cfg.device)
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
        server_round = int(config.get(KEY_SERVER_ROUND, 1))
        steps = num_local_steps(cfg, len(self.train))
        rng = np.random.default_rng([cfg.seed, server_round, self.partition_id])
        picks = sample_seed_indices(decode_probabilities(q, self.k), steps, rng)
        batches = batch_iterator(self.train, cfg.batch_size, self.tokenizer.pad_token_id,
                                 seed=cfg.seed + 1000 * server_round + self.partition_id)
        kept_idx: list[int] = []
        kept_g: list[float] = []
        losses: list[float] = []
        t0 = time.perf_counter()
        device = model_device(zm.model)
        try:
            for pick in picks:
                micro = [to_device(next(batches), device) for _ in range(cfg.grad_accum)]
                pair: list[float] = []

                def loss_fn(micro=micro, pair=pair) -> torch.Tensor:
                    loss = sum(zm.model(**b).loss for b in micro) / len(micro)
                    pair.append(float(loss))
                    return loss

                g = zo_step(zm.params, loss_fn, int(zm.seeds[pick]), eps=cfg.zo_eps,
                            lr=cfg.zo_lr, weight_decay=cfg.zo_weight_decay,
                            grad_clip=cfg.zo_grad_clip, cache_z=cfg.zo_cache_z)
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
