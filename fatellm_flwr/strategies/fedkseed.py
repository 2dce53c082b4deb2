"""FedKSeed server (Qin et al. 2023, arXiv 2312.06353; FATE-LLM's ``fedkseed``).

Full-parameter federated tuning where the model never travels. The server draws K
candidate seeds from the run seed (``zo-num-seeds``, :func:`~fatellm_flwr.zo.candidate_seeds`);
every local step of every client is a MeZO two-point zeroth-order step along the direction
``z(s)`` of one of them, so it is fully described by ``(seed index, g)``. The core (seeds,
z, steps, replay, seed history) is :mod:`fatellm_flwr.zo`; this module and
:mod:`fatellm_flwr.clients.fedkseed` only move scalars between the parties.

Aggregation
    A client starting from the global ``x`` ends at ``x - lr sum_j g_j z(s_j)`` (no weight
    decay). Weighted FedAvg of the clients' models (weights = training examples ``w_c``,
    ``W = sum w_c``) is therefore again a sum over seeds::

        x_new = x - sum_s delta[s] z(s),   delta[s] = lr * sum_c (w_c / W) * sum_{j: s_cj = s} g_cj

    The server keeps the global model as the cumulative coefficient vector
    ``C = sum of deltas`` (K float64; the global model is ``x0 - sum_s C[s] z(s)``), and a
    :class:`~fatellm_flwr.zo.SeedHistory` of the raw ``g``'s for probability-differentiated
    sampling. ``delta`` is rounded to float32 (what travels) before it is added, so every
    party adds the same numbers. Weight decay (``zo-weight-decay``) approximation: it acts
    inside each client's local trajectory (it moves the point where later ``g``'s are
    measured), but the server aggregates only the linear ZO part; the ``(1 - lr wd)^T``
    shrinkage of 2-D+ tensors (relative ``~T lr wd``: 2e-5 per round at lr 1e-5, wd 0.01,
    T 200) is not applied to the global model. Clients undo their own trajectory exactly,
    decay included, so all parties still hold the same global model. With wd = 0 (default)
    the aggregate is exactly FedAvg of the clients' models (up to float rounding).

Protocol (Flower's legacy fit/evaluate: float arrays + a config dict)
    Up (client -> server): ``[seed indices int32 (T'), g float32 (T')]`` for its ``T'``
    non-skipped local steps: ``8 T' + 256`` bytes (two .npy headers), independent of K.
    200 steps = 1,856 bytes.

    Down (server -> client): the *difference* between the coefficient vector the node
    already holds and the current one, plus the seed scores:

    - config ``fedkseed-version`` v (the version of ``C`` the message leads to; +1 per
      aggregated round), ``fedkseed-base`` b (the version the difference starts from; 0 =
      from ``x0``, i.e. the full vector), ``fedkseed-delta`` (encoding), ``fedkseed-probs``,
      ``fedkseed-run`` (run id);
    - arrays: ``C_v - C_b`` as the cheaper of sparse ``[indices uint16 (int32 for K > 65536),
      values float32]`` (6 bytes per seed that changed) or dense ``[float32 K]``, nothing
      when equal; then, from the second round on, the seed scores quantised to uint8
      (K bytes, :func:`~fatellm_flwr.wire.fedkseed.encode_probabilities`; the client's
      sampling distribution is within 0.2% of the exact one per seed).

    The server remembers, per node, the version it last brought that node to (a node that
    returned a fit or evaluate result saved that version in its Flower ``context.state``)
    and keeps snapshots of ``C`` only for versions some node holds. A node it knows gets
    only what changed since (normally the last round's seeds); an unknown node (first
    contact, after a failure, after a resume, or one that missed rounds whose snapshot was
    pruned) gets the full vector (b = 0), which any client can apply from ``x0``. A node
    whose state was lost answers ``fedkseed-need-full`` and gets the full vector next time.

    Why not always send the full vector (the simplest robust design)? It costs
    ``min(6 n, 4 K)`` bytes with n seeds used so far, i.e. 16 KB once most seeds have been
    used (K = 4096), plus 4 KB of scores and 1.9 KB up: over the paper's 18 KB per
    client-round. Sending differences costs ``6 x`` (seeds that changed last round, at most
    clients x steps) + 4 KB: 3 clients x 200 steps, K = 4096 -> ~7.7 KB down + 1.9 KB up
    (see ``benchmarks/fedkseed_comm.py`` for measured numbers). A full resend happens only
    for unknown nodes and is still bounded by 4 K + K bytes.

Replay cost
    A rebuild generates each seed's z once per tensor with its accumulated coefficient
    (:func:`~fatellm_flwr.zo.apply_seed_updates`), never per step or per round. A client
    process (simulation engine actor) keeps its rebuilt model and the exact coefficients it
    has applied (:class:`~fatellm_flwr.zo_model.ZoModel`): moving to the next
    global model undoes its own local steps and applies the round's delta in one pass over
    the seeds that changed (<= clients x steps, <= K), fewer z generations than the round's
    local training (3 per step, plus 2 forwards) when <= 3 clients train per round; with
    more clients it grows towards K. A fresh process (deployment spawns one per message)
    reloads ``x0`` and replays every seed used so far once: up to K z generations, which
    for SmolLM2-135M on a loaded 2-core CPU took 2.6-3.8 s per seed (benchmarks/fedkseed_comm.py),
    i.e. more than a round's training once thousands of seeds were used. Caching clients
    carry the float32 residue of their own +eps/-2eps/+eps perturbation round trips (~1 ulp
    per local step, a random walk); the server and freshly rebuilt clients do not.

Server side
    The server holds its own copy of the model and moves it with the same
    :class:`~fatellm_flwr.zo_model.ZoModel` to evaluate the global model every
    round. Flower's "global parameters" are ``[C]`` (what is checkpointed each round, with
    the seed history, the version and the run id, so ``resume-from`` continues). Each
    ``round-XXX/`` holds ``fedkseed-coefficients.npz`` (``C`` + what is needed to replay it:
    K, master seed, tuned tensors); ``final/`` holds the full model saved with
    ``save_pretrained`` (+ tokenizer), loadable with ``AutoModelForCausalLM``. The ledger's
    ``full_model_bytes`` is the full model in float32, so ``up_pct_of_full_model`` compares
    with full-parameter FedAvg.
"""

from __future__ import annotations

import io
import json
import uuid
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.common import (
    EvaluateIns,
    FitIns,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.strategy import FedAvg

from ..config import Config, ConfigError
from ..models import count_parameters, load_base_model, load_tokenizer
from ..outputs import (
    COEFFS_FILE,
    FULL_MODEL,
    MODEL_MANIFEST,
    ZO_COEFFICIENTS,
    atomic_write_bytes,
    atomic_write_json,
    model_manifest,
    save_model_folder,
)
from ..wire.common import parameters_nbytes
from ..wire.fedkseed import (
    KEY_BASE,
    KEY_DELTA,
    KEY_PROBS,
    KEY_RUN,
    KEY_VERSION,
    METRIC_NEED_FULL,
    encode_coefficients,
    encode_probabilities,
    upload_problem,
)
from ..zo import SeedHistory, candidate_seeds
from ..zo_model import ZoModel
from .base import TrackedStrategy
from .evaluation import HeldOutSet, model_evaluator

_EMPTY = Parameters(tensors=[], tensor_type="numpy.ndarray")


def check_fedkseed_config(cfg: Config) -> None:
    """Combinations FedKSeed cannot run, with what to change."""
    if cfg.quantization != "none":
        raise ConfigError(f"algorithm='fedkseed' needs quantization='none' (got "
                          f"{cfg.quantization!r}): zeroth-order steps perturb every tuned "
                          "weight by eps * z, which quantized weights cannot hold")
    if cfg.dp_sgd:
        raise ConfigError("dp-sgd=true does not apply to algorithm='fedkseed': it clips "
                          "per-sample gradients, and FedKSeed computes none")
    if cfg.client_dp != "none":
        raise ConfigError(f"client-dp={cfg.client_dp!r} does not apply to algorithm="
                          "'fedkseed': clients send (seed index, scalar) pairs, not a vector "
                          "update to clip and noise; use client-dp='none'")
    if cfg.aggregator != "fedavg":
        raise ConfigError(f"aggregator={cfg.aggregator!r} does not apply to algorithm="
                          "'fedkseed': its aggregate is FedAvg of the clients' models written "
                          "as per-seed coefficients; use aggregator='fedavg'")


# --------------------------------------------------------------------------- pure state
class SeedServer:
    """The server's FedKSeed state and payloads, without a model (pure numpy).

    ``coeffs`` (K float64) is the global model as ``x0 - sum_s coeffs[s] z(s)``; ``version``
    counts aggregated rounds; ``node_versions`` remembers which version each node holds.
    """

    def __init__(self, k: int, lr: float, bias_loss_clip: float = 1000.0):
        self.k = int(k)
        self.lr = float(lr)
        self.history = SeedHistory(self.k, bias_loss_clip)
        self.coeffs = np.zeros(self.k, dtype=np.float64)
        self.version = 0
        self.node_versions: dict[str, int] = {}
        self._snapshots: dict[int, np.ndarray] = {0: np.zeros(self.k)}

    def set_state(self, coeffs: np.ndarray, version: int) -> None:
        coeffs = np.asarray(coeffs, dtype=np.float64)
        if coeffs.shape != (self.k,):
            raise ValueError(f"coefficients of shape {coeffs.shape}, expected ({self.k},): "
                             "the checkpoint was written with another zo-num-seeds")
        self.coeffs, self.version = coeffs.copy(), int(version)
        self.node_versions.clear()
        self._snapshots = {0: np.zeros(self.k), self.version: self.coeffs.copy()}

    def aggregate(self, uploads: list[tuple[np.ndarray, np.ndarray, float]]) -> np.ndarray:
        """Fold the clients' ``(indices, gs, weight)`` into ``coeffs``; returns the delta."""
        weights = np.array([max(0.0, float(w)) for _, _, w in uploads], dtype=np.float64)
        if weights.sum() <= 0:
            weights = np.ones(len(uploads))
        weights /= weights.sum()
        acc = np.zeros(self.k, dtype=np.float64)
        for (idx, g, _), w in zip(uploads, weights):
            idx = np.asarray(idx, dtype=np.int64)
            g = np.asarray(g, dtype=np.float64)
            np.add.at(acc, idx, w * g)
            self.history.update(idx, g)
        delta = (self.lr * acc).astype(np.float32).astype(np.float64)  # what travels
        self.coeffs = self.coeffs + delta
        self.version += 1
        self._snapshots[self.version] = self.coeffs.copy()
        self._prune()
        return delta

    def download(self, node: str, probs: np.ndarray | None) -> tuple[list[np.ndarray], dict]:
        """``(arrays, config)`` bringing ``node`` to the current version."""
        base = self.node_versions.get(node, 0)
        if base not in self._snapshots or base > self.version:
            base = 0
        arrays, mode = encode_coefficients(self.coeffs - self._snapshots[base])
        if probs is not None:
            arrays.append(probs)
        return arrays, {KEY_VERSION: self.version, KEY_BASE: base, KEY_DELTA: mode,
                        KEY_PROBS: probs is not None}

    def synced(self, node: str, version: int) -> None:
        """``node`` now holds ``version`` (it returned a result for a message of it)."""
        if version in self._snapshots:
            self.node_versions[node] = int(version)
        else:
            self.forget(node)

    def forget(self, node: str) -> None:
        self.node_versions.pop(node, None)
        self._prune()

    def _prune(self) -> None:
        keep = {0, self.version, *self.node_versions.values()}
        for v in [v for v in self._snapshots if v not in keep]:
            del self._snapshots[v]


class _SeedAggregator(FedAvg):
    """Flower's FedAvg for client sampling; aggregation is the owner's seed arithmetic."""

    def __init__(self, owner: FedKSeedStrategy, **kwargs):
        super().__init__(**kwargs)
        self.owner = owner

    def aggregate_fit(self, server_round, results, failures):
        if not results:
            return None, {}
        return self.owner.aggregate_seeds(server_round, results), {}


# --------------------------------------------------------------------------- strategy
class FedKSeedStrategy(TrackedStrategy):
    """Server side of FedKSeed: seed coefficients, per-node differences, evaluation, saving."""

    def __init__(self, cfg: Config, run, initial: list[np.ndarray] | None = None,
                 round_offset: int = 0, ledger=None, strategy_state=None):
        check_fedkseed_config(cfg)
        self.tokenizer = load_tokenizer(cfg.model, cfg.gguf_file)
        model = load_base_model(cfg.model, cfg.gguf_file, "none", cfg.dtype, cfg.device).eval()
        self.seeds = candidate_seeds(cfg.zo_num_seeds, cfg.seed)
        self.zmodel = ZoModel(model, self.seeds, cfg.zo_exclude_embeddings)
        self.server = SeedServer(cfg.zo_num_seeds, cfg.zo_lr, cfg.zo_bias_loss_clip)
        if initial:
            self.server.set_state(initial[0], round_offset)
        _, total = count_parameters(model)
        tuned = int(sum(p.numel() for p in self.zmodel.params))
        inner = _SeedAggregator(
            self, fraction_fit=cfg.fraction_fit, fraction_evaluate=cfg.fraction_evaluate,
            min_fit_clients=cfg.min_fit_clients,
            min_evaluate_clients=1 if cfg.fraction_evaluate > 0 else 0,
            min_available_clients=cfg.min_available_clients,
            fit_metrics_aggregation_fn=lambda _: {},
            evaluate_metrics_aggregation_fn=lambda _: {})
        evaluate_fn, validate_fn = (
            model_evaluator(self.zmodel.model, self.tokenizer, cfg,
                            lambda arrays: self.zmodel.move_to(arrays[0]),
                            HeldOutSet(cfg, self.tokenizer, split))
            for split in ("test", "val"))
        super().__init__(cfg, inner, run, [self.server.coeffs.copy()],
                         full_model_bytes=4 * total, round_offset=round_offset, ledger=ledger,
                         evaluate_fn=evaluate_fn, validate_fn=validate_fn)
        self.run_id = uuid.uuid4().hex[:12]
        if strategy_state:
            self.load_strategy_state(strategy_state)
        self._sent: dict[tuple[str, int], tuple[int, set[str]]] = {}
        if round_offset == 0:
            self._pending.setdefault(0, {}).update({
                "zo_num_seeds": cfg.zo_num_seeds, "zo_tuned_params": tuned,
                "zo_full_model_bytes": 4 * total})
        log(INFO, "FedKSeed: K=%d seeds, %s of %s parameters tuned (embeddings %s), run %s",
            cfg.zo_num_seeds, f"{tuned:,}", f"{total:,}",
            "excluded" if cfg.zo_exclude_embeddings else "included", self.run_id)

    # ------------------------------------------------------------------ validation
    def check_result(self, arrays: list[np.ndarray]) -> str | None:
        return upload_problem(arrays, self.server.k, self.cfg.local_steps,
                              self.cfg.zo_grad_clip)

    # ------------------------------------------------------------------ messages
    def _payloads(self, kind: str, rnd: int, instructions, probs):
        out = []
        for proxy, ins in instructions:
            cid = str(proxy.cid)
            arrays, extra = self.server.download(cid, probs)
            params = ndarrays_to_parameters(arrays)
            config = {**ins.config, **extra, KEY_RUN: self.run_id}
            out.append((proxy, (FitIns if kind == "fit" else EvaluateIns)(params, config)))
            self.ledger.add(rnd, cid, down=parameters_nbytes(params))
        self._sent[(kind, rnd)] = (self.server.version, {str(p.cid) for p, _ in instructions})
        return out

    def configure_fit(self, server_round, parameters, client_manager):
        rnd = self.absolute(server_round)
        instructions = super().configure_fit(server_round, _EMPTY, client_manager)
        probs = encode_probabilities(self.server.history)
        out = self._payloads("fit", rnd, instructions, probs)
        full = sum(1 for _, ins in out if ins.config[KEY_BASE] == 0 and self.server.version)
        self._pending.setdefault(rnd, {})["zo_full_sends"] = full
        return out

    def _settle(self, kind: str, rnd: int, results, failures) -> list:
        """Update which version each node holds; return the results that are not
        ``need-full`` replies."""
        version, sent = self._sent.pop((kind, rnd), (self.server.version, set()))
        usable, seen = [], set()
        for proxy, res in results:
            cid = str(proxy.cid)
            seen.add(cid)
            if res.metrics.get(METRIC_NEED_FULL):
                self.server.forget(cid)
                if kind == "fit":
                    self.set_aside(rnd, [cid])
                log(WARNING, "round %d: client %s (partition %s) lacks the base version; it "
                    "is left out and gets the full coefficient vector next time", rnd, cid,
                    res.metrics.get("partition-id", "?"))
                continue
            self.server.synced(cid, version)
            usable.append((proxy, res))
        for failure in failures:
            if isinstance(failure, tuple):
                seen.discard(str(failure[0].cid))
                self.server.forget(str(failure[0].cid))
        for cid in sent - seen:  # failed or silent: its state is unknown
            self.server.forget(cid)
        return usable

    def aggregate_fit(self, server_round, results, failures):
        rnd = self.absolute(server_round)
        usable = self._settle("fit", rnd, results, failures)
        out = super().aggregate_fit(server_round, usable, failures)
        self._pending.setdefault(rnd, {})["clients_need_full"] = len(results) - len(usable)
        return out

    def aggregate_seeds(self, rnd: int, results) -> Parameters:
        """The FedKSeed aggregate of validated results: ``[C]`` after round ``rnd`` (the
        run's absolute round number, as the base class hands it to its inner strategy)."""
        uploads = []
        for _, res in results:
            idx, g = parameters_to_ndarrays(res.parameters)
            uploads.append((idx, g, res.num_examples))
        delta = self.server.aggregate(uploads)
        self._pending.setdefault(rnd, {}).update({
            "zo_version": self.server.version,
            "zo_steps_aggregated": int(sum(len(u[0]) for u in uploads)),
            "zo_seeds_updated": int(np.count_nonzero(delta)),
            "zo_seeds_used_total": int(np.count_nonzero(self.server.history.counts))})
        return ndarrays_to_parameters([self.server.coeffs.copy()])

    def configure_evaluate(self, server_round, parameters, client_manager):
        instructions = super().configure_evaluate(server_round, _EMPTY, client_manager)
        if not instructions:
            return []
        return self._payloads("evaluate", self.absolute(server_round), instructions, None)

    def aggregate_evaluate(self, server_round, results, failures):
        usable = self._settle("evaluate", self.absolute(server_round), results, failures)
        return super().aggregate_evaluate(server_round, usable, failures)

    # ------------------------------------------------------------------ evaluation, saving
    def coefficients_npz(self, coeffs: np.ndarray) -> bytes:
        """``C`` + what a reader needs to replay it onto ``x0`` (``zo`` functions)."""
        meta = {"model": self.cfg.model, "zo_num_seeds": self.cfg.zo_num_seeds,
                "seed": self.cfg.seed, "zo_exclude_embeddings": self.cfg.zo_exclude_embeddings,
                "how": "x = x0 - sum_s coeffs[s] * zo.z_for(shape_i, seeds[s], i) over "
                       "zo.zo_parameters(model, zo_exclude_embeddings); seeds = "
                       "zo.candidate_seeds(zo_num_seeds, seed)"}
        buf = io.BytesIO()
        np.savez(buf, coeffs=np.asarray(coeffs, dtype=np.float64),
                 meta=np.asarray(json.dumps(meta)))
        return buf.getvalue()

    def save_round(self, server_round: int, arrays: list[np.ndarray], folder: Path,
                   final: bool) -> None:
        npz = self.coefficients_npz(arrays[0])
        if not final:  # a few KB per round (and for best/); the full model only at the end
            atomic_write_bytes(folder / COEFFS_FILE, npz)
            atomic_write_json(folder / MODEL_MANIFEST, model_manifest(
                ZO_COEFFICIENTS, "fedkseed", self.cfg.model, self.cfg.gguf_file, server_round))
            return
        self.zmodel.move_to(arrays[0])
        save_model_folder(folder, self.zmodel.model, self.tokenizer,
                          kind=FULL_MODEL, algorithm="fedkseed", base_model=self.cfg.model,
                          gguf_file=self.cfg.gguf_file, server_round=server_round,
                          extra_files={COEFFS_FILE: npz})

    # ------------------------------------------------------------------ checkpoint
    def strategy_state(self) -> dict[str, np.ndarray]:
        out = super().strategy_state()
        out.update({f"history_{k}": v for k, v in self.server.history.to_arrays().items()})
        out["version"] = np.asarray(self.server.version, dtype=np.int64)
        out["run_id"] = np.asarray(self.run_id)
        return out

    def load_strategy_state(self, arrays: dict[str, np.ndarray]) -> None:
        super().load_strategy_state(arrays)
        hist = {k.removeprefix("history_"): v for k, v in arrays.items()
                if k.startswith("history_")}
        if hist:
            self.server.history = SeedHistory.from_arrays(hist)
        if "version" in arrays:
            self.server.set_state(self.server.coeffs, int(arrays["version"]))
        if "run_id" in arrays:
            self.run_id = str(arrays["run_id"])
