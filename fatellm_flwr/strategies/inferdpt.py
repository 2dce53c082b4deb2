"""InferDPT server: the remote LLM answers the clients' perturbed prompts.

Tong et al., "InferDPT: Privacy-preserving Inference for Black-box Large Language Models"
(arXiv 2310.12214); the cores are in :mod:`fatellm_flwr.privacy.inferdpt`.

Message flow — one Flower round = one ask/answer exchange, fitted to the server-driven
fit -> evaluate sequence of Flower's default workflow (legacy messages, no arrays travel):

1. ``configure_fit``: every sampled client gets a fit instruction (round number only).
2. Client ``fit``: takes its next ``inferdpt-queries`` prompts from its own data, perturbs
   them locally with RANTEXT (epsilon per token, its local model's embedding table), keeps
   the originals in its ``context.state`` and returns only the perturbed texts (metric
   ``inferdpt-prompts``, a JSON list).
3. ``aggregate_fit``: the server's LLM (``inferdpt-remote-model``) answers every perturbed
   prompt; answers are kept per client.
4. ``configure_evaluate``: each client that asked gets its own answers (``inferdpt-answers``)
   in an evaluate instruction addressed to it alone.
5. Client ``evaluate``: its local model extracts the final answers from the original prompts
   and the perturbed answers; they stay on the node. It reports only aggregate numbers
   (ROUGE-L against its own references, fraction of tokens unchanged, seconds per query).

The server sees perturbed prompts, never the originals or the final answers.
"""

from __future__ import annotations

import json
import time
from logging import INFO, WARNING

from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from ..config import Config
from ..metrics import CommLedger
from ..outputs import RunDir
from ..wire.common import KEY_SERVER_ROUND, encode_arrays
from ..wire.inferdpt import KEY_ANSWERS, KEY_ASK_ROUND, METRIC_PROMPTS, decode_texts, encode_texts
from .base import weighted_mean_metrics
from .outbox import NodeOutbox

_EMPTY = encode_arrays([])


class InferDPTStrategy(Strategy):
    """Holds the remote LLM; answers perturbed prompts; hands answers back to their askers."""

    def __init__(self, cfg: Config, run: RunDir, initial=None, round_offset: int = 0,
                 ledger: CommLedger | None = None, strategy_state=None, remote=None):
        super().__init__()
        self.cfg, self.run, self.round_offset = cfg, run, round_offset
        self.ledger = ledger or CommLedger()
        self._remote = remote  # a list[str] -> list[str] callable (tests); else loaded lazily
        self._answers: dict[str, tuple[ClientProxy, list[str], int]] = {}
        self._record: dict[str, float] = {}
        self._t0 = time.perf_counter()
        self.outbox = NodeOutbox()  # the ServerApp's grid reads it; InferDPT queues nothing

    # ----------------------------------------------------------------- remote LLM
    @property
    def remote(self):
        if self._remote is None:
            from ..models import load_base_model, load_tokenizer
            from ..privacy.inferdpt import hf_generator

            tok = load_tokenizer(self.cfg.inferdpt_remote_model)
            model = load_base_model(self.cfg.inferdpt_remote_model, device=self.cfg.device)
            self._remote = hf_generator(model, tok, self.cfg.max_new_tokens,
                                        self.cfg.use_chat_template)
        return self._remote

    @staticmethod
    def split_checkpoint(arrays):
        return [], {}

    # ----------------------------------------------------------------- Flower API
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return _EMPTY

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self._t0 = time.perf_counter()
        rnd = server_round + self.round_offset
        client_manager.wait_for(self.cfg.min_available_clients)
        n = max(self.cfg.min_fit_clients,
                int(self.cfg.fraction_fit * client_manager.num_available()))
        clients = client_manager.sample(num_clients=n, min_num_clients=self.cfg.min_fit_clients)
        return [(c, FitIns(_EMPTY, {KEY_SERVER_ROUND: rnd})) for c in clients]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        rnd = server_round + self.round_offset
        for failure in failures:
            log(WARNING, "round %d: a client failed and is left out: %s", rnd, failure)
        asked: list[tuple[ClientProxy, list[str]]] = []
        for proxy, res in results:
            raw = res.metrics.get(METRIC_PROMPTS, "[]")
            self.ledger.add(rnd, str(proxy.cid), up=len(str(raw).encode()))
            try:
                asked.append((proxy, decode_texts(raw)))
            except ValueError as e:
                log(WARNING, "round %d: client %s sent unusable prompts (%s)", rnd, proxy.cid, e)
        prompts = [p for _, ps in asked for p in ps]
        t0 = time.perf_counter()
        answers = self.remote(prompts) if prompts else []
        remote_s = time.perf_counter() - t0
        self._answers, start = {}, 0
        for proxy, ps in asked:
            self._answers[str(proxy.cid)] = (proxy, answers[start:start + len(ps)], rnd)
            start += len(ps)
        self._record = {"clients_ok": len(asked), "clients_failed": len(failures),
                        "queries": float(len(prompts)), "remote_time_s": remote_s,
                        "remote_s_per_query": remote_s / max(1, len(prompts))}
        log(INFO, "round %d: remote LLM answered %d perturbed prompts in %.1fs", rnd,
            len(prompts), remote_s)
        return _EMPTY, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        out = []
        for cid, (proxy, answers, rnd) in self._answers.items():
            text = encode_texts(answers)
            self.ledger.add(rnd, cid, down=len(text.encode()))
            out.append((proxy, EvaluateIns(_EMPTY, {KEY_SERVER_ROUND: rnd, KEY_ASK_ROUND: rnd,
                                                    KEY_ANSWERS: text})))
        return out

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list) -> tuple[float | None, dict[str, Scalar]]:
        rnd = server_round + self.round_offset
        pairs = [(r.num_examples, dict(r.metrics)) for _, r in results]
        metrics = weighted_mean_metrics(pairs)
        metrics.pop("partition-id", None)
        record = {"round": rnd, **self._record, **self.ledger.round_totals(rnd),
                  **{f"eval_{k}": v for k, v in metrics.items()},
                  "round_time_s": time.perf_counter() - self._t0}
        self.run.add_record(record)
        self.run.save_checkpoint(rnd, {}, {"algorithm": self.cfg.algorithm,
                                           "ledger": self.ledger.to_json()})
        log(INFO, "[round %d] %s", rnd, ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in record.items() if k != "round"))
        self._answers = {}
        return None, metrics

    def evaluate(self, server_round: int, parameters: Parameters):
        return None  # nothing to evaluate centrally: the server holds no answers' references

    def finish(self) -> str:
        (self.run.path / "communication.json").write_text(
            json.dumps(self.ledger.to_json(), indent=2))
        keys = ("queries", "eval_rouge-l", "eval_inferdpt_unchanged", "eval_inferdpt_s_per_query",
                "bytes_up", "bytes_down")
        lines = ["round | " + " | ".join(keys)]
        for r in self.run.records:
            lines.append(f"{r['round']} | " + " | ".join(
                f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys))
        return "\n".join(lines)
