"""FedMKT client: a small LM (its own family and tokenizer) that learns from and teaches
the server's LLM through top-k logits on a public set (protocol: :mod:`..wire.fedmkt`).

- fit: restore this node's SLM adapter (``context.state``), tune it with LoRA on the
  private partition, send its top-k log-probabilities and per-example cross-entropy on the
  public set;
- evaluate: distil the LLM's aligned top-k (if the message carries it) into the SLM with
  ``(1 - fedmkt-lambda) LM + fedmkt-lambda KD`` on the public set, keep the adapter, report
  validation metrics of the SLM, and in the last round save the adapter
  (``<fedmkt-save-dir>/slm-partition-<id>``).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.client import NumPyClient

from ..config import Config
from ..fedmkt import Teacher, distill, encode_public, public_examples, slm_model_for, topk_logprobs
from ..flexlora import client_rank
from ..metrics import evaluate_model
from ..models import get_trainable_state, load_peft_model, set_trainable_state, trainable_names
from ..outputs import PEFT_ADAPTER, save_model_folder
from ..train import num_local_steps, train_local
from ..wire.common import KEY_SERVER_ROUND
from ..wire.fedmkt import (
    KEY_SAVE_DIR,
    KEY_TEACHER,
    METRIC_SLM,
    METRIC_SLM_VOCAB,
    STATE_ADAPTER,
    STATE_META,
    decode_topk,
    encode_topk,
    topk_problem,
)
from .datasets import client_datasets, per_tokenizer

_INITIAL: dict[tuple, list[np.ndarray]] = {}  # SLM config -> its adapter as first loaded
_PUBLIC: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # see per_tokenizer
_FALLBACK: dict[int, list[np.ndarray]] = {}  # adapter per partition when there is no context


class FedMKTClient(NumPyClient):
    """One organisation's SLM in FedMKT."""

    def __init__(self, cfg: Config, partition_id: int, num_partitions: int,
                 context: Context | None = None):
        self.cfg, self.context, self.partition_id = cfg, context, partition_id
        node = context.node_config if context is not None else {}
        self.slm = slm_model_for(cfg, node, partition_id)
        self.rank = client_rank(cfg, node, partition_id)
        same = self.slm == cfg.model
        self.slm_cfg = cfg.replace(model=self.slm, gguf_file=cfg.gguf_file if same else "",
                                   quantization=cfg.quantization if same else "none",
                                   lora_r=self.rank)
        self.model, self.tokenizer = load_peft_model(self.slm_cfg)
        s = self.slm_cfg
        self._init_key = (s.model, s.gguf_file, s.quantization, s.dtype, s.peft_method, s.lora_r,
                          s.lora_alpha, s.lora_dropout, s.target_modules, s.seed)
        _INITIAL.setdefault(self._init_key, get_trainable_state(self.model))
        self.task_data, self.train, self.val_raw, self.val = client_datasets(
            self.slm_cfg, self.tokenizer, partition_id, num_partitions)
        public = per_tokenizer(_PUBLIC, self.tokenizer)
        key = (cfg.public_dataset, cfg.fedmkt_public_size, cfg.dataset, cfg.test_size,
               cfg.max_length, cfg.seed, cfg.use_chat_template)
        if key not in public:
            pub_task, pub_raw = public_examples(cfg)
            public[key] = encode_public(self.tokenizer, cfg, pub_task, pub_raw)
        self.public = public[key]

    # ------------------------------------------------------------------ node state
    def _restore(self) -> None:
        names = trainable_names(self.model)
        arrays = None
        if self.context is not None:
            meta = self.context.state.config_records.get(STATE_META)
            if meta is not None and str(meta["slm"]) == self.slm and int(meta["r"]) == self.rank:
                rec = self.context.state.array_records[STATE_ADAPTER]
                arrays = [rec[n].numpy() for n in names]
        elif self.partition_id in _FALLBACK:
            arrays = _FALLBACK[self.partition_id]
        set_trainable_state(self.model, arrays if arrays is not None
                            else _INITIAL[self._init_key])

    def _keep(self) -> None:
        arrays = get_trainable_state(self.model)
        if self.context is None:
            _FALLBACK[self.partition_id] = arrays
            return
        self.context.state.array_records[STATE_ADAPTER] = ArrayRecord(array_dict=OrderedDict(
            (n, Array(np.ascontiguousarray(a)))
            for n, a in zip(trainable_names(self.model), arrays)))
        self.context.state.config_records[STATE_META] = ConfigRecord(
            {"slm": self.slm, "r": self.rank})

    def _ids(self) -> dict:
        return {"partition-id": self.partition_id, METRIC_SLM: self.slm,
                METRIC_SLM_VOCAB: len(self.tokenizer), "lora-r": self.rank}

    # ------------------------------------------------------------------ Flower API
    def get_parameters(self, config) -> list[np.ndarray]:
        return []

    def fit(self, parameters, config):
        if self.partition_id in self.cfg.failing_partitions:
            raise RuntimeError(f"injected failure of partition {self.partition_id} "
                               "(fail-partitions)")
        self._restore()
        rnd = int(config.get(KEY_SERVER_ROUND, 1))
        seed = self.cfg.seed + 1000 * rnd + self.partition_id
        torch.manual_seed(seed)
        steps = num_local_steps(self.cfg, len(self.train))
        metrics = train_local(self.model, self.train, self.slm_cfg, steps=steps,
                              pad_id=self.tokenizer.pad_token_id, seed=seed,
                              desc=f"fedmkt client {self.partition_id} round {rnd}")
        self._keep()
        topk, ce = topk_logprobs(self.model, self.public, self.cfg.fedmkt_top_k,
                                 self.cfg.eval_batch_size, self.tokenizer.pad_token_id)
        return encode_topk(topk, ce), len(self.train), {**metrics, **self._ids(),
                                                         "local_steps": steps}

    def evaluate(self, parameters, config):
        self._restore()
        rnd = int(config.get(KEY_SERVER_ROUND, 0))
        out: dict = dict(self._ids())
        if config.get(KEY_TEACHER) and len(parameters):
            problem = topk_problem(parameters, [len(e["input_ids"]) for e in self.public],
                                   self.cfg.fedmkt_top_k, len(self.tokenizer), with_ce=False,
                                   allow_unmapped=True)
            if problem is not None:
                raise ValueError(f"the server's top-k payload is unusable: {problem}")
            teacher, _ = decode_topk(parameters)
            torch.manual_seed(self.cfg.seed + 7919 * rnd + self.partition_id)
            dm = distill(self.model, self.public, [[Teacher(1.0, t)] for t in teacher],
                         lam=self.cfg.fedmkt_lambda, lr=self.cfg.lr,
                         epochs=self.cfg.fedmkt_distill_epochs,
                         batch_size=self.cfg.batch_size, pad_id=self.tokenizer.pad_token_id,
                         max_grad_norm=self.cfg.max_grad_norm, seed=self.cfg.seed + rnd)
            out.update({f"slm_{k}": v for k, v in dm.items()})
            self._keep()
        if config.get(KEY_SAVE_DIR):
            from pathlib import Path

            save_model_folder(Path(str(config[KEY_SAVE_DIR])) / f"slm-partition-"
                              f"{self.partition_id}", self.model, self.tokenizer,
                              kind=PEFT_ADAPTER, algorithm="fedmkt", base_model=self.slm,
                              server_round=rnd)
        if len(self.val) == 0:
            return 0.0, 0, out
        m = evaluate_model(self.model, self.tokenizer, self.val_raw, self.val, self.task_data,
                           self.slm_cfg)
        loss = float(m.pop("loss"))
        out.update({f"slm_{k}": v for k, v in m.items()})
        return loss, len(self.val), out
