"""InferDPT client: perturbs its own prompts, extracts final answers from the remote ones.

The flow is explained in :mod:`fatellm_flwr.strategies.inferdpt`; the cores are in
:mod:`fatellm_flwr.privacy.inferdpt`. The original prompts wait for their answers in the
node's ``context.state`` (each message starts a fresh ClientApp process in a deployment);
final answers are appended to ``<output-dir>/inferdpt-answers-<partition-id>.jsonl`` on the
node's own disk and never sent anywhere.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.client import NumPyClient

from ..config import Config
from ..data import federated_data
from ..metrics import rouge_l
from ..privacy.inferdpt import InferDPT, hf_generator, perturber_for
from ..wire.common import KEY_SERVER_ROUND
from ..wire.inferdpt import (
    KEY_ANSWERS,
    KEY_ASK_ROUND,
    METRIC_PROMPTS,
    STATE_PENDING,
    decode_texts,
    encode_texts,
)

_LOCAL: dict[tuple, tuple] = {}  # one local model per process (simulation actors reuse it)
_FALLBACK: dict[int, str] = {}


def local_model(cfg: Config):
    """``(model, tokenizer, perturber)`` of the client's local model, cached per process."""
    key = (cfg.model, cfg.gguf_file, cfg.dtype, cfg.device, cfg.inferdpt_top_k)
    if key not in _LOCAL:
        from ..models import load_base_model, load_tokenizer

        tok = load_tokenizer(cfg.model, cfg.gguf_file)
        model = load_base_model(cfg.model, cfg.gguf_file, dtype=cfg.dtype, device=cfg.device)
        model.eval()
        _LOCAL.clear()
        _LOCAL[key] = (model, tok, perturber_for(model, tok, cfg.inferdpt_top_k))
    return _LOCAL[key]


class InferDPTClient(NumPyClient):
    def __init__(self, cfg: Config, partition_id: int, num_partitions: int,
                 context: Context | None = None):
        self.cfg, self.context = cfg, context
        self.partition_id, self.num_partitions = partition_id, num_partitions
        self.model, self.tokenizer, self.perturber = local_model(cfg)
        self.pipeline = InferDPT(
            hf_generator(self.model, self.tokenizer, cfg.max_new_tokens, cfg.use_chat_template),
            self.tokenizer, self.perturber, cfg.inferdpt_epsilon)

    def get_parameters(self, config):
        return []

    # ---------------------------------------------------------------- node state
    def _save_pending(self, pending: dict) -> None:
        text = json.dumps(pending, ensure_ascii=False)
        if self.context is None:
            _FALLBACK[self.partition_id] = text
        else:
            self.context.state.config_records[STATE_PENDING] = ConfigRecord({"pending": text})

    def _load_pending(self) -> dict | None:
        if self.context is None:
            text = _FALLBACK.get(self.partition_id)
        else:
            rec = self.context.state.config_records.get(STATE_PENDING)
            text = None if rec is None else str(rec["pending"])
        return None if text is None else json.loads(text)

    def _queries(self, server_round: int) -> tuple[list[str], list[str]]:
        """This round's ``(prompts, references)`` from the node's own data (cycling)."""
        data = federated_data(self.cfg, self.num_partitions)
        part = data.partition(self.partition_id)
        q = self.cfg.inferdpt_queries
        idx = [((server_round - 1) * q + i) % len(part) for i in range(min(q, len(part)))]
        rows = [data.task_data.prompt_and_target(self.cfg, part[i]) for i in idx]
        return [r[0] for r in rows], [r[1] for r in rows]

    # ---------------------------------------------------------------- Flower API
    def fit(self, parameters, config):
        rnd = int(config.get(KEY_SERVER_ROUND, 1))
        prompts, refs = self._queries(rnd)
        t0 = time.perf_counter()
        perturbed, unchanged = self.pipeline.perturb(prompts)
        self._save_pending({"round": rnd, "prompts": prompts, "references": refs,
                            "perturbed": perturbed, "unchanged": unchanged,
                            "perturb_s": time.perf_counter() - t0})
        return [], len(prompts), {METRIC_PROMPTS: encode_texts(perturbed),
                                  "partition-id": self.partition_id}

    def evaluate(self, parameters, config):
        pending = self._load_pending()
        rnd = int(config.get(KEY_ASK_ROUND, -1))
        if pending is None or pending["round"] != rnd:
            raise RuntimeError(f"received answers for round {rnd} but this node's pending "
                               f"prompts are from round {pending and pending['round']}")
        drafts = decode_texts(config[KEY_ANSWERS])
        if len(drafts) != len(pending["prompts"]):
            raise RuntimeError(f"{len(drafts)} answers for {len(pending['prompts'])} prompts")
        t0 = time.perf_counter()
        answers = self.pipeline.extract(pending["prompts"], drafts)
        local_s = time.perf_counter() - t0 + pending["perturb_s"]
        out = Path(self.cfg.output_dir) / f"inferdpt-answers-{self.partition_id}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            for p, s, d, a in zip(pending["prompts"], pending["perturbed"], drafts, answers):
                f.write(json.dumps({"round": rnd, "prompt": p, "sent": s, "remote_answer": d,
                                    "answer": a}, ensure_ascii=False) + "\n")
        n = len(answers)
        metrics = {"rouge-l": rouge_l(answers, pending["references"]),
                   "inferdpt_unchanged": sum(pending["unchanged"]) / max(1, n),
                   "inferdpt_local_s_per_query": local_s / max(1, n),
                   "partition-id": self.partition_id}
        return 0.0, n, metrics
