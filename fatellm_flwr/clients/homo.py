"""FedHomoLLM client: local PEFT training on this node's partition."""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.client import NumPyClient

from ..config import Config
from ..data import federated_data, tokenize_dataset
from ..metrics import evaluate_model
from ..models import get_trainable_state, load_peft_model, set_trainable_state
from ..train import num_local_steps, train_local, train_local_dp

_TOKENIZED: dict[tuple, tuple] = {}
_DP_HISTORY_KEY = "fatellm.dp-history"
_DP_HISTORY_FALLBACK: dict[int, list] = {}


def load_dp_history(context: Context | None, partition_id: int) -> list:
    """This node's DP-SGD accounting history ``[(noise, sample_rate, steps), ...]``.

    Kept in the node's Flower ``context.state`` (persists across rounds in simulation and
    deployment); a process-level dict, per partition, serves when no context is given.
    """
    if context is None:
        return _DP_HISTORY_FALLBACK.get(partition_id, [])
    rec = context.state.config_records.get(_DP_HISTORY_KEY)
    return json.loads(str(rec["history"])) if rec is not None else []


def save_dp_history(context: Context | None, partition_id: int, history: list) -> None:
    if context is None:
        _DP_HISTORY_FALLBACK[partition_id] = list(history)
        return
    context.state.config_records[_DP_HISTORY_KEY] = ConfigRecord(
        {"history": json.dumps([list(h) for h in history])})


def client_datasets(cfg: Config, tokenizer, partition_id: int, num_partitions: int):
    """``(task_data, train, val_raw, val)`` of one partition, tokenized once per process.

    Flower builds a new client object for every message; the simulation engine's actors
    live across rounds, so the partition is split and tokenized only on first use.
    """
    key = (id(tokenizer), partition_id, num_partitions, cfg.max_length, cfg.val_fraction,
           cfg.prompt_template, cfg.use_chat_template, cfg.dataset, cfg.seed)
    if key not in _TOKENIZED:
        data = federated_data(cfg, num_partitions)
        train, val = data.client_split(partition_id, cfg.val_fraction, cfg.seed)
        _TOKENIZED[key] = (data.task_data, tokenize_dataset(train, tokenizer, cfg, data.task_data),
                           val, tokenize_dataset(val, tokenizer, cfg, data.task_data))
    return _TOKENIZED[key]


class HomoClient(NumPyClient):
    """Receives the global adapter, trains it locally, returns it with its example count."""

    def __init__(self, cfg: Config, partition_id: int, num_partitions: int,
                 context: Context | None = None):
        self.cfg = cfg
        self.context = context
        self.partition_id = partition_id
        self.model, self.tokenizer = load_peft_model(cfg)
        self.task_data, self.train, self.val_raw, self.val = client_datasets(
            cfg, self.tokenizer, partition_id, num_partitions)

    def get_parameters(self, config) -> list[np.ndarray]:
        return get_trainable_state(self.model)

    def fit(self, parameters, config):
        if self.partition_id in self.cfg.failing_partitions:
            raise RuntimeError(f"injected failure of partition {self.partition_id} "
                               "(fail-partitions)")
        set_trainable_state(self.model, parameters)
        server_round = int(config.get("server-round", 1))
        prox = None
        if self.cfg.proximal_mu > 0:
            prox = [p.detach().clone() for p in self.model.parameters() if p.requires_grad]
        steps = num_local_steps(self.cfg, len(self.train))
        seed = self.cfg.seed + 1000 * server_round + self.partition_id
        torch.manual_seed(seed)
        desc = f"client {self.partition_id} round {server_round}"
        if self.cfg.dp_sgd:
            metrics, history = train_local_dp(
                self.model, self.train, self.cfg, steps=steps,
                pad_id=self.tokenizer.pad_token_id, seed=seed,
                prior_history=load_dp_history(self.context, self.partition_id), desc=desc)
            save_dp_history(self.context, self.partition_id, history)
        else:
            metrics = train_local(self.model, self.train, self.cfg, steps=steps,
                                  pad_id=self.tokenizer.pad_token_id, seed=seed,
                                  prox_reference=prox, desc=desc)
        metrics["partition-id"] = self.partition_id
        metrics["local_steps"] = steps
        return get_trainable_state(self.model), len(self.train), metrics

    def evaluate(self, parameters, config):
        set_trainable_state(self.model, parameters)
        if len(self.val) == 0:
            return float("nan"), 0, {"partition-id": self.partition_id}
        metrics = evaluate_model(self.model, self.tokenizer, self.val_raw, self.val,
                                 self.task_data, self.cfg)
        loss = metrics.pop("loss")
        return float(loss), len(self.val), {**metrics, "partition-id": self.partition_id}
