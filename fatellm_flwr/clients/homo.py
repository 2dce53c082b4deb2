"""FedHomoLLM client: local PEFT training on this node's partition."""

from __future__ import annotations

import numpy as np
import torch
from flwr.client import NumPyClient

from ..config import Config
from ..data import federated_data, tokenize_dataset
from ..metrics import evaluate_model
from ..models import get_trainable_state, load_peft_model, set_trainable_state
from ..train import num_local_steps, train_local

_TOKENIZED: dict[tuple, tuple] = {}


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

    def __init__(self, cfg: Config, partition_id: int, num_partitions: int):
        self.cfg = cfg
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
        metrics = train_local(self.model, self.train, self.cfg, steps=steps,
                              pad_id=self.tokenizer.pad_token_id, seed=seed, prox_reference=prox,
                              desc=f"client {self.partition_id} round {server_round}")
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
