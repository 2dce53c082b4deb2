"""The strategy every algorithm builds on: a thin orchestrator of small collaborators.

:class:`TrackedStrategy` wraps a Flower strategy that does the aggregation (``inner``) and
adds what a real run needs around it, each piece in its own module:

- :mod:`.validation`: results with wrong shapes or NaN/Inf are dropped with a logged reason
  (the round goes on; with no client left the previous global state is kept);
- :mod:`.secagg`: SecAgg+'s summed delta is turned back into a state in the global state's
  dtype, and each client's upload is counted as what it really sent;
- :mod:`.records`: client counts (failures counted by node) and metrics, one record per
  round in the run folder;
- :mod:`.evaluation`: the server evaluates the global state every round (round 0 = the
  untrained start) with an injected ``evaluate_fn`` (as Flower's strategies do);
- :mod:`.best`: with ``best-metric``, the round that scores best on validation data is
  kept in ``best/``;
- :mod:`.checkpoint`: each completed round is checkpointed atomically with the server
  optimizer's state, so ``resume-from`` continues exactly where a run stopped;
- :mod:`.outbox`: records a node needs once travel in their own records, not in
  ``Parameters``;
- the byte ledger (:class:`~fatellm_flwr.metrics.CommLedger`): bytes up/down per client.
"""

from __future__ import annotations

import hashlib
import json
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from ..config import Config
from ..metrics import CommLedger
from ..outputs import FINAL, RunDir
from ..wire.common import (
    KEY_ADAPTIVE,
    KEY_SERVER_ROUND,
    METRIC_SECAGG_UP,
    METRIC_SKIPPED,
    SEND_DELTA,
    decode_arrays,
    encode_arrays,
    parameters_nbytes,
)
from . import checkpoint
from .best import BEST, BEST_ROUND, best_round, improves
from .evaluation import EvaluateFn, HeldOutSet
from .outbox import NodeOutbox
from .records import HEADLINE_KEYS, RoundRecords, failed_nodes, weighted_mean_metrics
from .secagg import from_delta, keep_dtypes, upload_nbytes
from .validation import shape_problem

__all__ = ["TrackedStrategy", "parameters_nbytes", "weighted_mean_metrics"]


class TrackedStrategy(Strategy):
    """A Flower strategy with validation, accounting, evaluation and checkpoints.

    ``evaluate_fn`` (``arrays -> metrics``, ``loss`` first) evaluates the global state on
    the server's test set, ``validate_fn`` on its validation set (``server-val-size``);
    subclasses may instead override :meth:`evaluate_global` / :meth:`validate_global`, and
    implement :meth:`save_round`; they may override :meth:`check_result` /
    :meth:`fit_config` / :meth:`strategy_state`.
    """

    def __init__(self, cfg: Config, inner: Strategy, run: RunDir, initial: list[np.ndarray],
                 full_model_bytes: int, round_offset: int = 0,
                 ledger: CommLedger | None = None, evaluate_fn: EvaluateFn | None = None,
                 validate_fn: EvaluateFn | None = None):
        super().__init__()
        self.cfg = cfg
        self.inner = inner
        self.run = run
        self.current = [np.asarray(a) for a in initial]
        self.round_offset = round_offset
        self.ledger = ledger or CommLedger(full_model_bytes)
        self.ledger.full_model_bytes = full_model_bytes
        self.evaluate_fn, self.validate_fn = evaluate_fn, validate_fn
        self.records = RoundRecords(run)
        self._pending = self.records.pending  # a round's values until it is recorded
        self._instructed: dict[int, set[str]] = {}  # nodes sent a fit instruction, per round
        self._set_aside: dict[int, set[str]] = {}  # nodes whose reply a subclass kept back
        self._round_start = time.perf_counter()
        self._held_out: HeldOutSet | None = None
        self.outbox = NodeOutbox()  # records sent once to a node, outside Parameters

    @property
    def aggregator(self) -> Strategy:
        """The aggregating strategy under any DP wrapper."""
        return checkpoint.aggregator_of(self.inner)

    # ----------------------------------------------------------------- hooks
    def evaluate_global(self, arrays: list[np.ndarray]) -> dict[str, float]:
        """Server-side metrics of the global state (``loss`` first): ``evaluate_fn``'s."""
        return self.evaluate_fn(arrays) if self.evaluate_fn is not None else {}

    def validate_global(self, arrays: list[np.ndarray]) -> dict[str, float]:
        """Metrics of the global state on the server's validation set: ``validate_fn``'s."""
        return self.validate_fn(arrays) if self.validate_fn is not None else {}

    def save_round(self, server_round: int, arrays: list[np.ndarray], folder: Path,
                   final: bool) -> None:
        """Write the round's global artefact (adapter/model) to ``folder`` (a round's,
        ``best/``, or ``final/`` when ``final``)."""

    def check_result(self, arrays: list[np.ndarray]) -> str | None:
        """Why a client's result can't be aggregated, or None when it is fine."""
        return shape_problem(arrays, self.current)

    def fit_config(self, server_round: int) -> dict[str, Scalar]:
        """Extra config sent to clients with each fit instruction."""
        return {}

    def test_sets(self) -> tuple:
        """``(task data, raw test set, tokenized test set)`` of the server's evaluation set,
        tokenized once with the subclass's ``self.tokenizer``."""
        if self._held_out is None:
            self._held_out = HeldOutSet(self.cfg, self.tokenizer)
        return self._held_out.get()

    def strategy_state(self) -> dict[str, np.ndarray]:
        """State to checkpoint: the server optimizer's moments (fedadam/fedyogi/fedavgm),
        the adaptive clipping norm; subclasses extend ``super().strategy_state()`` (seed
        histories...)."""
        return checkpoint.optimizer_state(self.inner)

    def load_strategy_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`strategy_state` saved."""
        checkpoint.load_optimizer_state(self.inner, arrays)

    def set_aside(self, rnd: int, cids) -> None:
        """Subclasses: these nodes replied in (absolute) round ``rnd`` but their results are
        kept out of the aggregate (e.g. "send me the emulator"): not counted as failed."""
        self._set_aside.setdefault(rnd, set()).update(map(str, cids))

    # ----------------------------------------------------------------- Flower API
    def absolute(self, server_round: int) -> int:
        """The run's round number (Flower counts from 1 again in a resumed run)."""
        return server_round + self.round_offset

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return encode_arrays(self.current, self.cfg.wire_dtype)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self._round_start = time.perf_counter()
        rnd = self.absolute(server_round)
        instructions = self.inner.configure_fit(rnd, parameters, client_manager)
        extra = {KEY_SERVER_ROUND: rnd, **self.fit_config(rnd)}
        if self.cfg.secure_aggregation:
            extra[SEND_DELTA] = True  # small values inside SecAgg+'s clipping range
        if self.cfg.client_dp == "client-adaptive":
            extra[KEY_ADAPTIVE] = True
        down = parameters_nbytes(parameters)
        for proxy, ins in instructions:
            ins.config.update(extra)
            self.ledger.add(rnd, str(proxy.cid), down=down)
        # one round is in flight at a time (a round SecAgg+ aborted leaves no entry behind)
        self._instructed = {rnd: {str(proxy.cid) for proxy, _ in instructions}}
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
        skipped = 0
        for proxy, res in results:
            self.ledger.add(rnd, str(proxy.cid), up=upload_nbytes(res))
            if res.metrics.get(METRIC_SKIPPED):  # nothing to train on: left out, not failed
                log(INFO, "round %d: client %s (partition %s) skipped: %s", rnd, proxy.cid,
                    res.metrics.get("partition-id", "?"), res.metrics[METRIC_SKIPPED])
                skipped += 1
                continue
            arrays = decode_arrays(res.parameters)
            reason = self.check_result(arrays)
            if reason is not None:
                log(WARNING, "round %d: dropping client %s (partition %s): %s", rnd, proxy.cid,
                    res.metrics.get("partition-id", "?"), reason)
                continue
            if self.cfg.secure_aggregation:  # the (aggregated) update came as a delta
                res.parameters = encode_arrays(from_delta(arrays, self.current))
            elif self.cfg.wire_dtype != "float32":  # aggregate in float32, not the wire dtype
                res.parameters = encode_arrays(arrays)
            valid.append((proxy, res))
            per_client.append((res.num_examples, res.metrics))
        replied = {str(p.cid) for p, _ in results} | self._set_aside.pop(rnd, set())
        failed = failed_nodes(self._instructed.pop(rnd, None), replied, failures)
        record = self.records.of(rnd)
        record.update({"clients_ok": len(valid),
                       "clients_failed": failed + len(results) - len(valid) - skipped,
                       "clients_skipped": skipped, "distinct_updates_seen": distinct})
        if not valid:
            log(WARNING, "round %d: no usable client result; keeping the previous global "
                "state", rnd)
            return None, {}
        # absolute rounds: FedAdam/FedYogi's bias correction and FedAvgM's first-round
        # momentum reset must not restart in a resumed run
        params, _ = self.inner.aggregate_fit(rnd, valid, [])
        if params is None:
            return None, {}
        self.current = keep_dtypes(decode_arrays(params), self.current)
        checkpoint.sync_optimizer(self.inner, self.current)
        metrics = weighted_mean_metrics(per_client)
        for key in ("partition-id", METRIC_SECAGG_UP):
            metrics.pop(key, None)
        record.update({f"fit_{k}": v for k, v in metrics.items()})
        return encode_arrays(self.current, self.cfg.wire_dtype), metrics

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        rnd = self.absolute(server_round)
        instructions = self.inner.configure_evaluate(rnd, parameters, client_manager)
        for _, ins in instructions:
            ins.config[KEY_SERVER_ROUND] = rnd
        return instructions

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list) -> tuple[float | None, dict[str, Scalar]]:
        if not results:
            return None, {}
        pairs = [(r.num_examples, {"loss": r.loss, **r.metrics}) for _, r in results]
        metrics = weighted_mean_metrics(pairs)
        metrics.pop("partition-id", None)
        rnd = self.absolute(server_round)
        values = {f"eval_{k}": v for k, v in metrics.items()}
        values.update(self.keep_best(rnd, values, self.current))
        self.records.add_to_written(rnd, values)
        return metrics.get("loss"), metrics

    def evaluate(self, server_round: int,
                 parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Called once before round 1 (round 0) and after every round's aggregation."""
        rnd = self.absolute(server_round)
        if server_round == 0 and self.round_offset > 0:
            return None  # resumed: this state was evaluated and saved by the earlier run
        arrays = decode_arrays(parameters)
        t0 = time.perf_counter()
        metrics = self.evaluate_global(arrays) if self.cfg.server_eval else {}
        values: dict[str, Any] = {f"server_{k}": v for k, v in metrics.items()}
        if self.cfg.server_val_size:
            values.update({f"server_val_{k}": v
                           for k, v in self.validate_global(arrays).items()})
        values["server_eval_time_s"] = time.perf_counter() - t0
        if server_round > 0:
            values.update(self.ledger.round_totals(rnd))
            values.update(self.client_dp_metrics(rnd))
            values["round_time_s"] = time.perf_counter() - self._round_start
            if self.cfg.save_every_round:
                self.save_round(rnd, arrays, self.run.round_dir(rnd), final=False)
            self.run.save_checkpoint(rnd, self._checkpoint_arrays(arrays), {
                "algorithm": self.cfg.algorithm,
                "ledger": self.ledger.to_json(),
            })
        values.update(self.keep_best(rnd, values, arrays))  # best/ first, then the record
        self.records.write(rnd, values)
        loss = metrics.get("loss", float("nan"))
        return float(loss), {k: v for k, v in metrics.items() if k != "loss"}

    def keep_best(self, rnd: int, values: dict[str, Any],
                  arrays: list[np.ndarray]) -> dict[str, int]:
        """With ``best-metric`` in round ``rnd``'s ``values``: save the round's artefact to
        ``best/`` when it beats every earlier round; returns the record's ``best_round``
        (written after ``best/``, so a record never names a round ``best/`` lacks)."""
        metric = self.cfg.best_metric
        if not metric or not isinstance(values.get(metric), (int, float)):
            return {}
        before = best_round(self.run.records, metric, exclude=rnd)
        if improves(metric, float(values[metric]), before):
            self.save_round(rnd, arrays, self.run.path / BEST, final=False)
            log(INFO, "round %d: best so far by %s (%.4g); saved in %s", rnd, metric,
                values[metric], self.run.path / BEST)
            before = (rnd, float(values[metric]))
        return {BEST_ROUND: before[0]}

    def client_dp_metrics(self, rounds: int) -> dict[str, float]:
        """Client-level epsilon after ``rounds`` rounds, composed over each round's real
        sampling rate (clients sampled / available, recorded by the DP wrapper at
        configure_fit; a resumed run reads earlier rounds' rates from their records, and
        counts a round without one as if every client trained), this round's rate, and the
        current clipping norm of the client-level DP wrapper."""
        rate_of = getattr(self.inner, "sampling_rate", None)  # by absolute round
        if self.cfg.client_dp == "none" or rate_of is None:
            return {}  # no client-level DP wrapper: no client-level guarantee to report
        from ..privacy.client_dp import client_level_epsilon_rates

        recorded = {r.get("round"): r.get("client_dp_sampling_rate") for r in self.run.records}
        rates = []
        for k in range(1, rounds + 1):
            q = rate_of(k)
            q = recorded.get(k) if q is None else q
            if q is None:
                log(WARNING, "client-level DP: no sampling rate recorded for round %d; "
                    "accounting it at rate 1 (worst case)", k)
            rates.append(1.0 if q is None else float(q))
        out = {"client_dp_sampling_rate": rates[-1],
               "client_dp_epsilon": client_level_epsilon_rates(
                   self.cfg.client_dp_noise_multiplier, rates, self.cfg.dp_delta,
                   self.cfg.dp_accountant)}
        norm = getattr(self.inner, "clipping_norm", None)
        if norm is not None:
            out["client_dp_clip_norm"] = float(norm)
        return out

    # ----------------------------------------------------------------- checkpoints, end
    def _checkpoint_arrays(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        return checkpoint.checkpoint_arrays(arrays, self.strategy_state())

    split_checkpoint = staticmethod(checkpoint.split_checkpoint)

    def finish(self) -> str:
        """Save the final artefact, plots and return the summary table."""
        self.save_round(self.cfg.num_server_rounds, self.current, self.run.path / FINAL,
                        final=True)
        if self.cfg.plots:
            self.run.plot()
        (self.run.path / "communication.json").write_text(
            json.dumps(self.ledger.to_json(), indent=2))
        return self.headline() + "\n" + self.run.summary_table()

    def headline(self) -> str:
        """``server_accuracy: 0.24 (round 0) -> 0.90 (round 3)`` for each server metric, and
        the best round by ``best-metric`` with its test numbers."""
        lines = [self.records.headline()]
        metric = self.cfg.best_metric
        best = best_round(self.run.records, metric) if metric else None
        if best is not None:
            rec = next(r for r in self.run.records if r["round"] == best[0])
            test = ", ".join(f"{k} {rec[k]:.4f}" for k in HEADLINE_KEYS if k in rec)
            lines.append(f"best round by {metric}: {best[0]} ({best[1]:.4f}; saved in "
                         f"{BEST}/){'; test ' + test if test else ''}")
        return "\n".join(line for line in lines if line)
