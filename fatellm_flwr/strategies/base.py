"""Bookkeeping shared by every algorithm's strategy.

:class:`TrackedStrategy` wraps a Flower strategy that does the aggregation (``inner``) and
adds what a real run needs around it: results with wrong shapes or NaN/Inf are dropped
with a logged reason (the round goes on; with no client left the previous global state is
kept), bytes up/down per client are counted, the server evaluates the global state every
round (round 0 = the untrained start), and each completed round is checkpointed
atomically so ``resume-from`` continues where a run stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from ..config import Config
from ..data import split_pool_and_test, tokenize_dataset
from ..metrics import CommLedger
from ..mods import KEY_ADAPTIVE, SEND_DELTA
from ..outputs import RunDir

# server-optimizer state of Flower's FedAdam/FedYogi (m_t, v_t) and FedAvgM (momentum)
_OPT_STATE = ("m_t", "v_t", "momentum_vector")


def parameters_nbytes(parameters: Parameters) -> int:
    """Bytes of the serialised tensors that travel."""
    return int(sum(len(t) for t in parameters.tensors))


def weighted_mean_metrics(pairs: list[tuple[int, dict[str, Scalar]]]) -> dict[str, float]:
    """Example-weighted mean of every numeric metric reported by the clients.

    Privacy spent (``*epsilon``) is the worst case over clients, not a mean.
    """
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    worst: dict[str, float] = {}
    for n, metrics in pairs:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                if k.endswith("epsilon"):
                    worst[k] = max(worst.get(k, float("-inf")), float(v))
                    continue
                totals[k] = totals.get(k, 0.0) + n * float(v)
                weights[k] = weights.get(k, 0.0) + n
    return {**{k: totals[k] / weights[k] for k in totals if weights[k] > 0}, **worst}


class TrackedStrategy(Strategy):
    """A Flower strategy with validation, accounting, evaluation and checkpoints.

    Subclasses implement :meth:`evaluate_global`, :meth:`save_round` and may override
    :meth:`check_result` / :meth:`fit_config` / :meth:`strategy_state`.
    """

    def __init__(self, cfg: Config, inner: Strategy, run: RunDir, initial: list[np.ndarray],
                 full_model_bytes: int, round_offset: int = 0,
                 ledger: CommLedger | None = None):
        super().__init__()
        self.cfg = cfg
        self.inner = inner
        self.run = run
        self.current = [np.asarray(a) for a in initial]
        self.round_offset = round_offset
        self.ledger = ledger or CommLedger(full_model_bytes)
        self.ledger.full_model_bytes = full_model_bytes
        self._round_start = time.perf_counter()
        self._pending: dict[int, dict[str, Any]] = {}
        self._test: tuple | None = None

    @property
    def aggregator(self) -> Strategy:
        """The aggregating strategy under any DP wrapper."""
        return getattr(self.inner, "strategy", self.inner)

    # ----------------------------------------------------------------- hooks
    def evaluate_global(self, arrays: list[np.ndarray]) -> dict[str, float]:
        """Server-side metrics of the global state (``loss`` first)."""
        return {}

    def save_round(self, server_round: int, arrays: list[np.ndarray], final: bool) -> None:
        """Write the round's global artefact (adapter/model) under the run folder."""

    def check_result(self, arrays: list[np.ndarray]) -> str | None:
        """Why a client's result can't be aggregated, or None when it is fine."""
        if len(arrays) != len(self.current):
            return f"sent {len(arrays)} arrays, expected {len(self.current)}"
        for i, (a, ref) in enumerate(zip(arrays, self.current)):
            if a.shape != ref.shape:
                return f"array {i} has shape {a.shape}, expected {ref.shape}"
            if not np.all(np.isfinite(a)):
                return f"array {i} contains NaN or Inf"
        return None

    def fit_config(self, server_round: int) -> dict[str, Scalar]:
        """Extra config sent to clients with each fit instruction."""
        return {}

    def test_sets(self) -> tuple:
        """``(task data, raw test set, tokenized test set)`` of the server's held-out split,
        tokenized once with the subclass's ``self.tokenizer``."""
        if self._test is None:
            task_data, _, test, _ = split_pool_and_test(self.cfg)
            self._test = (task_data, test, tokenize_dataset(test, self.tokenizer, self.cfg,
                                                            task_data))
        return self._test

    def strategy_state(self) -> dict[str, np.ndarray]:
        """State to checkpoint: the server optimizer's moments (fedadam/fedyogi/fedavgm),
        the adaptive clipping norm; subclasses extend ``super().strategy_state()`` (seed
        histories...)."""
        norm = getattr(self.inner, "clipping_norm", None)
        out = {} if norm is None else {"dp_clipping_norm": np.asarray(float(norm))}
        for attr in _OPT_STATE:
            value = getattr(self.aggregator, attr, None)
            if value is not None:
                out.update({f"{attr}_{i:05d}": a for i, a in enumerate(value)})
        return out

    def load_strategy_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`strategy_state` saved."""
        if "dp_clipping_norm" in arrays and hasattr(self.inner, "clipping_norm"):
            self.inner.clipping_norm = float(arrays["dp_clipping_norm"])
        for attr in _OPT_STATE:
            keys = sorted(k for k in arrays if k.startswith(f"{attr}_"))
            if keys:
                setattr(self.aggregator, attr, [arrays[k] for k in keys])

    # ----------------------------------------------------------------- Flower API
    def absolute(self, server_round: int) -> int:
        return server_round + self.round_offset

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.current)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self._round_start = time.perf_counter()
        rnd = self.absolute(server_round)
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        extra = {"server-round": rnd, **self.fit_config(rnd)}
        if self.cfg.secure_aggregation:
            extra[SEND_DELTA] = True  # small values inside SecAgg+'s clipping range
        if self.cfg.client_dp == "client-adaptive":
            extra[KEY_ADAPTIVE] = True
        down = parameters_nbytes(parameters)
        for proxy, ins in instructions:
            ins.config.update(extra)
            self.ledger.add(rnd, str(proxy.cid), down=down)
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        rnd = self.absolute(server_round)
        for failure in failures:
            reason = failure if isinstance(failure, BaseException) else failure[1].status
            log(WARNING, "round %d: a client failed and is left out: %s", rnd, reason)
        valid: list[tuple[ClientProxy, FitRes]] = []
        per_client: list[tuple[int, dict[str, Scalar]]] = []
        # audit: how many distinct updates the server saw (1 under SecAgg+: only the sum)
        distinct = len({hashlib.sha1(b"".join(r.parameters.tensors)).digest()
                        for _, r in results})
        for proxy, res in results:
            self.ledger.add(rnd, str(proxy.cid), up=parameters_nbytes(res.parameters))
            reason = self.check_result(parameters_to_ndarrays(res.parameters))
            if reason is not None:
                log(WARNING, "round %d: dropping client %s (partition %s): %s", rnd, proxy.cid,
                    res.metrics.get("partition-id", "?"), reason)
                continue
            if self.cfg.secure_aggregation:  # the (aggregated) update came as a delta
                res.parameters = ndarrays_to_parameters(
                    [d + c for d, c in zip(parameters_to_ndarrays(res.parameters),
                                           self.current)])
            valid.append((proxy, res))
            per_client.append((res.num_examples, res.metrics))
        record = self._pending.setdefault(rnd, {})
        record.update({"clients_ok": len(valid), "clients_failed": len(results) + len(failures)
                       - len(valid), "distinct_updates_seen": distinct})
        if not valid:
            log(WARNING, "round %d: no usable client result; keeping the previous global "
                "state", rnd)
            return None, {}
        params, _ = self.inner.aggregate_fit(server_round, valid, [])
        if params is None:
            return None, {}
        self.current = parameters_to_ndarrays(params)
        metrics = weighted_mean_metrics(per_client)
        metrics.pop("partition-id", None)
        record.update({f"fit_{k}": v for k, v in metrics.items()})
        return params, metrics

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        instructions = self.inner.configure_evaluate(server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config["server-round"] = self.absolute(server_round)
        return instructions

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list) -> tuple[float | None, dict[str, Scalar]]:
        if not results:
            return None, {}
        rnd = self.absolute(server_round)
        pairs = [(r.num_examples, {"loss": r.loss, **r.metrics}) for _, r in results]
        metrics = weighted_mean_metrics(pairs)
        metrics.pop("partition-id", None)
        record = next((r for r in self.run.records if r["round"] == rnd), None)
        if record is not None:
            record.update({f"eval_{k}": v for k, v in metrics.items()})
            self.run.add_record(record)
        return metrics.get("loss"), metrics

    def evaluate(self, server_round: int,
                 parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Called once before round 1 (round 0) and after every round's aggregation."""
        rnd = self.absolute(server_round)
        if server_round == 0 and self.round_offset > 0:
            return None  # resumed: this state was evaluated and saved by the earlier run
        arrays = parameters_to_ndarrays(parameters)
        t0 = time.perf_counter()
        metrics = self.evaluate_global(arrays) if self.cfg.server_eval else {}
        record: dict[str, Any] = {"round": rnd, **self._pending.pop(rnd, {})}
        record.update({f"server_{k}": v for k, v in metrics.items()})
        record["server_eval_time_s"] = time.perf_counter() - t0
        if server_round > 0:
            record.update(self.ledger.round_totals(rnd))
            record.update(self.client_dp_metrics(rnd))
            record["round_time_s"] = time.perf_counter() - self._round_start
            if self.cfg.save_every_round:
                self.save_round(rnd, arrays, final=False)
            self.run.save_checkpoint(rnd, self._checkpoint_arrays(arrays), {
                "algorithm": self.cfg.algorithm,
                "ledger": self.ledger.to_json(),
            })
        self.run.add_record(record)
        shown = ", ".join(f"{k}={_short(v)}" for k, v in record.items() if k != "round")
        log(INFO, "[round %d] %s", rnd, shown)
        loss = metrics.get("loss", float("nan"))
        return float(loss), {k: v for k, v in metrics.items() if k != "loss"}

    def client_dp_metrics(self, rounds: int) -> dict[str, float]:
        """Client-level epsilon after ``rounds`` rounds (sampling rate = fraction-fit) and
        the current clipping norm of the client-level DP wrapper."""
        if self.cfg.client_dp == "none":
            return {}
        from ..privacy.client_dp import client_level_epsilon

        out = {"client_dp_epsilon": client_level_epsilon(
            self.cfg.client_dp_noise_multiplier, self.cfg.fraction_fit, rounds,
            self.cfg.dp_delta, self.cfg.dp_accountant)}
        norm = getattr(self.inner, "clipping_norm", None)
        if norm is not None:
            out["client_dp_clip_norm"] = float(norm)
        return out

    # ----------------------------------------------------------------- checkpoint helpers
    def _checkpoint_arrays(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        out = {f"global_{i:05d}": a for i, a in enumerate(arrays)}
        out.update({f"strategy_{k}": v for k, v in self.strategy_state().items()})
        return out

    @staticmethod
    def split_checkpoint(arrays: dict[str, np.ndarray]) -> tuple[list[np.ndarray],
                                                                  dict[str, np.ndarray]]:
        """``(global arrays in order, strategy state)`` from a loaded checkpoint."""
        glob = [arrays[k] for k in sorted(k for k in arrays if k.startswith("global_"))]
        state = {k.removeprefix("strategy_"): v for k, v in arrays.items()
                 if k.startswith("strategy_")}
        return glob, state

    def finish(self) -> str:
        """Save the final artefact, plots and return the summary table."""
        self.save_round(self.cfg.num_server_rounds, self.current, final=True)
        if self.cfg.plots:
            self.run.plot()
        (self.run.path / "communication.json").write_text(
            json.dumps(self.ledger.to_json(), indent=2))
        return self.headline() + "\n" + self.run.summary_table()

    def headline(self) -> str:
        """``server_accuracy: 0.24 (round 0) -> 0.90 (round 3)`` for each server metric."""
        recs = self.run.records
        if not recs:
            return ""
        out = []
        for key in ("server_accuracy", "server_rouge-l", "server_loss"):
            pts = [(r["round"], r[key]) for r in recs if key in r]
            if len(pts) >= 2:
                out.append(f"{key}: {pts[0][1]:.4f} (round {pts[0][0]}) -> {pts[-1][1]:.4f} "
                           f"(round {pts[-1][0]})")
        return "\n".join(out)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
