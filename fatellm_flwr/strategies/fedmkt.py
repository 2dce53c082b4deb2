"""FedMKT server (Fan et al. 2024, arXiv 2406.02224; FATE-LLM's ``fedmkt``).

The server holds the LLM (``model``) with a LoRA adapter; each client holds an SLM of any
family and tokenizer (``slm-models`` / node config ``slm-model``). The core (top-k, token
alignment, KD loss, teacher selection, distillation) is :mod:`fatellm_flwr.fedmkt` and
:mod:`fatellm_flwr.alignment`; this module moves top-k payloads (:mod:`..wire.fedmkt`).

One Flower round = one FedMKT round:

- fit (down: no arrays): clients tune their SLMs on private data and reply with their
  top-k log-probabilities and per-example CE on the public set, and their SLM's name;
- aggregate_fit: each payload is checked (lengths against the server's own tokenization of
  the public set with that SLM's tokenizer, token ids in range, no NaN/Inf: otherwise the
  client is dropped with a logged reason), aligned to the LLM's tokens and vocabulary,
  teachers are picked per example (``fedmkt-selection``) and distilled into the LLM's LoRA
  (``(1 - fedmkt-lambda) LM + fedmkt-lambda KD`` over ``fedmkt-distill-epochs``); a
  distillation that leaves a non-finite weight is undone;
- evaluate (down: the LLM's top-k aligned to each client's tokenizer, to the clients whose
  fit result was used, whatever ``fraction-evaluate`` says): clients distil it into their
  SLMs, report SLM validation metrics (``eval_slm_*``) and, in the last round, save their
  SLM adapters under this run's folder (``slm-partition-<id>``; a deployment's nodes write
  to the same path on their own machines).

The server learns each client's SLM from its first fit reply and loads that tokenizer
(a hub id or ``builtin:`` resolves anywhere; a local path must exist on the server too).
The LLM is evaluated every round on the held-out test split minus the public slice; its
adapter is what is checkpointed and saved (``round-XXX/``, ``final/``). Bytes: only the
top-k payloads travel (``8 k`` bytes per token + lengths and CE), counted in the ledger;
``full_model_bytes`` is the LLM in float32.
"""

from __future__ import annotations

from functools import partial
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.common import EvaluateIns, FitIns, Parameters
from flwr.common.logger import log
from flwr.server.strategy import FedAvg

from ..config import Config
from ..fedmkt import (
    Teacher,
    align_sequences,
    distill,
    encode_public,
    public_examples,
    teacher_weights,
    topk_logprobs,
)
from ..metrics import evaluate_model
from ..models import (
    count_parameters,
    get_trainable_state,
    load_peft_model,
    load_tokenizer,
    set_trainable_state,
)
from ..outputs import PEFT_ADAPTER, save_model_folder
from ..wire.common import KEY_SERVER_ROUND, decode_arrays, encode_arrays, parameters_nbytes
from ..wire.fedmkt import (
    KEY_SAVE_DIR,
    KEY_TEACHER,
    METRIC_SLM,
    METRIC_SLM_VOCAB,
    decode_topk,
    encode_topk,
    topk_problem,
)
from .base import TrackedStrategy
from .evaluation import HeldOutSet, model_evaluator
from .records import failed_nodes, weighted_mean_metrics

_EMPTY = Parameters(tensors=[], tensor_type="numpy.ndarray")


class FedMKTStrategy(TrackedStrategy):
    """Server side of FedMKT: the LLM, alignment, selection and distillation."""

    def __init__(self, cfg: Config, run, initial: list[np.ndarray] | None = None,
                 round_offset: int = 0, ledger=None, strategy_state=None):
        self.model, self.tokenizer = load_peft_model(cfg)
        if initial is not None:
            set_trainable_state(self.model, initial)
        initial = get_trainable_state(self.model)
        _, total = count_parameters(self.model)
        inner = FedAvg(fraction_fit=cfg.fraction_fit, fraction_evaluate=0.0,
                       min_fit_clients=cfg.min_fit_clients, min_evaluate_clients=0,
                       min_available_clients=cfg.min_available_clients)
        validate_fn = model_evaluator(self.model, self.tokenizer, cfg,
                                      partial(set_trainable_state, self.model),
                                      HeldOutSet(cfg, self.tokenizer, "val"))
        super().__init__(cfg, inner, run, initial, full_model_bytes=4 * total,
                         round_offset=round_offset, ledger=ledger, validate_fn=validate_fn)
        pub_task, pub_raw = public_examples(cfg)
        self._public_data = (pub_task, pub_raw)
        self.public = encode_public(self.tokenizer, cfg, pub_task, pub_raw)
        self._slm_tokenizers: dict[str, object] = {}
        self._slm_public: dict[str, list[dict]] = {}
        self._slm_of: dict[str, str] = {}  # cid -> SLM reference
        self._taught: dict[int, list] = {}  # round -> [(proxy, slm)] whose results were used
        self._llm_topk: list | None = None
        self._down: dict[str, list[np.ndarray]] = {}
        self._eval_sets: tuple | None = None
        if round_offset == 0:
            self._pending.setdefault(0, {}).update({
                "fedmkt_public_examples": len(self.public),
                "fedmkt_llm_vocab": len(self.tokenizer)})
        log(INFO, "FedMKT: LLM %s (vocab %d), %d public examples, top-k %d, lambda %.3g, "
            "selection %s", cfg.model, len(self.tokenizer), len(self.public), cfg.fedmkt_top_k,
            cfg.fedmkt_lambda, cfg.fedmkt_selection)

    # ------------------------------------------------------------------ helpers
    def slm_tokenizer(self, slm: str):
        """A client SLM's tokenizer (loaded once) and the public set encoded with it."""
        if slm not in self._slm_tokenizers:
            tok = self.tokenizer if slm == self.cfg.model else load_tokenizer(slm)
            self._slm_tokenizers[slm] = tok
            self._slm_public[slm] = encode_public(tok, self.cfg, *self._public_data)
        return self._slm_tokenizers[slm], self._slm_public[slm]

    def llm_topk(self) -> list:
        """The LLM's top-k on the public set (computed once per LLM state)."""
        if self._llm_topk is None:
            self._llm_topk, _ = topk_logprobs(self.model, self.public, self.cfg.fedmkt_top_k,
                                              self.cfg.eval_batch_size,
                                              self.tokenizer.pad_token_id)
        return self._llm_topk

    def download(self, slm: str) -> list[np.ndarray]:
        """The LLM's top-k aligned to ``slm``'s tokenizer (cached per LLM state)."""
        if slm not in self._down:
            tok, enc = self.slm_tokenizer(slm)
            aligned = align_sequences(self.tokenizer, tok, self.public, enc, self.llm_topk())
            self._down[slm] = encode_topk(aligned)
        return self._down[slm]

    def _problem(self, res) -> tuple[str | None, tuple | None]:
        slm = res.metrics.get(METRIC_SLM)
        if not isinstance(slm, str) or not slm:
            return f"no {METRIC_SLM!r} metric naming its SLM", None
        try:
            tok, enc = self.slm_tokenizer(slm)
        except Exception as e:  # noqa: BLE001 - any load failure drops this client only
            return f"cannot load the tokenizer of its SLM {slm!r}: {e}", None
        vocab = res.metrics.get(METRIC_SLM_VOCAB)
        if vocab != len(tok):
            return (f"its SLM {slm!r} has a vocabulary of {vocab}, the server's copy of that "
                    f"tokenizer {len(tok)}"), None
        arrays = decode_arrays(res.parameters)
        problem = topk_problem(arrays, [len(e["input_ids"]) for e in enc],
                               self.cfg.fedmkt_top_k, len(tok), with_ce=True)
        return problem, (slm, tok, enc, arrays)

    # ------------------------------------------------------------------ Flower API
    def configure_fit(self, server_round, parameters, client_manager):
        # nothing travels down at fit time: the LLM's knowledge goes out with evaluate
        instructions = super().configure_fit(server_round, _EMPTY, client_manager)
        return [(proxy, FitIns(_EMPTY, dict(ins.config))) for proxy, ins in instructions]

    def aggregate_fit(self, server_round, results, failures):
        rnd = self.absolute(server_round)
        for failure in failures:
            reason = failure if isinstance(failure, BaseException) else failure[1].status
            log(WARNING, "round %d: a client failed and is left out: %s", rnd, reason)
        used, per_client = [], []
        for proxy, res in results:
            self.ledger.add(rnd, str(proxy.cid), up=parameters_nbytes(res.parameters))
            problem, parsed = self._problem(res)
            if problem is not None:
                log(WARNING, "round %d: dropping client %s (partition %s): %s", rnd, proxy.cid,
                    res.metrics.get("partition-id", "?"), problem)
                continue
            slm, tok, enc, arrays = parsed
            topk, ce = decode_topk(arrays)
            aligned = align_sequences(tok, self.tokenizer, enc, self.public, topk)
            used.append((proxy, slm, aligned, ce))
            per_client.append((res.num_examples, res.metrics))
            self._slm_of[str(proxy.cid)] = slm
        replied = {str(p.cid) for p, _ in results}
        record = self.records.of(rnd)
        record.update({"clients_ok": len(used),
                       "clients_failed": failed_nodes(self._instructed.pop(rnd, None), replied,
                                                      failures) + len(results) - len(used)})
        self._taught[rnd] = [(p, s) for p, s, _, _ in used]
        if not used:
            log(WARNING, "round %d: no usable client result; the LLM is not distilled", rnd)
            return None, {}
        ce = np.stack([u[3] for u in used])
        usable = np.array([[bool((i >= 0).any()) for _, i in u[2]] for u in used])
        weights = teacher_weights(ce, usable, self.cfg.fedmkt_selection)
        teachers = [[Teacher(float(weights[c, n]), used[c][2][n]) for c in range(len(used))
                     if weights[c, n] > 0] for n in range(len(self.public))]
        torch.manual_seed(self.cfg.seed + rnd)
        before = [a.copy() for a in self.current]
        dm = distill(self.model, self.public, teachers, lam=self.cfg.fedmkt_lambda,
                     lr=self.cfg.lr, epochs=self.cfg.fedmkt_distill_epochs,
                     batch_size=self.cfg.batch_size, pad_id=self.tokenizer.pad_token_id,
                     max_grad_norm=self.cfg.max_grad_norm, seed=self.cfg.seed + rnd)
        state = get_trainable_state(self.model)
        if all(np.isfinite(a).all() for a in state):
            self.current = state
        else:
            log(WARNING, "round %d: the LLM's distillation produced NaN/Inf weights; undone",
                rnd)
            set_trainable_state(self.model, before)
        self._llm_topk, self._down = None, {}
        metrics = weighted_mean_metrics(per_client)
        metrics.pop("partition-id", None)
        record.update({f"fit_{k}": v for k, v in metrics.items()})
        record.update({f"llm_{k}": v for k, v in dm.items()})
        record["fedmkt_examples_taught"] = int(sum(1 for t in teachers if t))
        record["fedmkt_aligned_fraction"] = float(np.mean(
            [(i >= 0).any(-1).mean() for u in used for _, i in u[2] if len(i)]))
        return encode_arrays(self.current), metrics

    def configure_evaluate(self, server_round, parameters, client_manager):
        rnd = self.absolute(server_round)
        final = rnd == self.cfg.num_server_rounds
        out = []
        for proxy, slm in self._taught.pop(rnd, []):
            config = {KEY_SERVER_ROUND: rnd, KEY_TEACHER: True}
            if final:
                config[KEY_SAVE_DIR] = str(self.run.path)
            params = encode_arrays(self.download(slm))
            self.ledger.add(rnd, str(proxy.cid), down=parameters_nbytes(params))
            out.append((proxy, EvaluateIns(params, config)))
        return out

    def aggregate_evaluate(self, server_round, results, failures):
        rnd = self.absolute(server_round)
        for failure in failures:
            reason = failure if isinstance(failure, BaseException) else failure[1].status
            log(WARNING, "round %d: a client's SLM distillation/evaluation failed: %s", rnd,
                reason)
        # the LLM's top-k went down after the round's record was written: bytes again
        self.records.add_to_written(rnd, self.ledger.round_totals(rnd))
        return super().aggregate_evaluate(server_round, results, failures)

    # ------------------------------------------------------------------ evaluation, outputs
    def test_sets(self) -> tuple:
        """The held-out set minus the public slice (when the public set was carved out of
        it)."""
        if self._eval_sets is None:
            if self._held_out is None:
                self._held_out = HeldOutSet(self.cfg, self.tokenizer)
            task, raw, tokenized = self._held_out.get()
            if not self.cfg.public_dataset and self.cfg.server_eval_dataset == "" and len(raw):
                keep = range(min(len(self.public), len(raw)), len(raw))
                raw, tokenized = raw.select(keep), tokenized.select(keep)
            self._eval_sets = (task, raw, tokenized)
        return self._eval_sets

    def evaluate_global(self, arrays: list[np.ndarray]) -> dict[str, float]:
        task_data, raw, tokenized = self.test_sets()
        if task_data is None or len(raw) == 0:
            return {}
        set_trainable_state(self.model, arrays)
        return evaluate_model(self.model, self.tokenizer, raw, tokenized, task_data, self.cfg)

    def save_round(self, server_round: int, arrays: list[np.ndarray], folder: Path,
                   final: bool) -> None:
        set_trainable_state(self.model, arrays)
        save_model_folder(folder,
                          self.model, self.tokenizer, kind=PEFT_ADAPTER, algorithm="fedmkt",
                          base_model=self.cfg.model, gguf_file=self.cfg.gguf_file,
                          server_round=server_round)
