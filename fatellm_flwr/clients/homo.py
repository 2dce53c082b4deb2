"""FedHomoLLM client: local PEFT training on this node's partition."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context
from flwr.client import NumPyClient

from ..config import Config
from ..flexlora import client_rank, fit_to_model
from ..metrics import evaluate_model
from ..models import get_trainable_state, load_peft_model, set_trainable_state
from ..train import num_local_steps, train_local, train_local_dp
from ..wire.common import KEY_SERVER_ROUND, to_wire
from .datasets import client_datasets
from .node_state import load_dp_history, save_dp_history

__all__ = ["HomoClient", "client_datasets", "load_dp_history", "save_dp_history"]


class HomoClient(NumPyClient):
    """Receives the global adapter, trains it locally, returns it with its example count."""

    def __init__(self, cfg: Config, partition_id: int, num_partitions: int,
                 context: Context | None = None):
        if cfg.peft_method == "lora":  # FlexLoRA: this node's own rank (lora-ranks / node lora-r)
            rank = client_rank(cfg, context.node_config if context is not None else {},
                               partition_id)
            cfg = cfg if rank == cfg.lora_r else cfg.replace(lora_r=rank)
        self.cfg = cfg
        self.context = context
        self.partition_id = partition_id
        self.model, self.tokenizer = load_peft_model(cfg)
        self.task_data, self.train, self.val_raw, self.val = client_datasets(
            cfg, self.tokenizer, partition_id, num_partitions)

    def get_parameters(self, config) -> list[np.ndarray]:
        return to_wire(get_trainable_state(self.model), self.cfg.wire_dtype)

    def fit(self, parameters, config):
        if self.partition_id in self.cfg.failing_partitions:
            raise RuntimeError(f"injected failure of partition {self.partition_id} "
                               "(fail-partitions)")
        set_trainable_state(self.model, fit_to_model(self.model, parameters, self.cfg.lora_alpha))
        server_round = int(config.get(KEY_SERVER_ROUND, 1))
        prox = None
        if self.cfg.proximal_mu > 0:
            prox = [p.detach().clone() for p in self.model.parameters() if p.requires_grad]
        steps = num_local_steps(self.cfg, len(self.train))
        seed = self.cfg.seed + 1000 * server_round + self.partition_id
        torch.manual_seed(seed)
        desc = f"client {self.partition_id} round {server_round}"
        extra_loss, ipr_metrics = None, {}
        if self.cfg.fedipr:  # FedIPR: check own signature on the global model, then embed it
            from ..privacy.fedipr import regulariser
            from .fedipr import detection_metrics, node_secret

            secret = node_secret(self.cfg, self.model, self.context, self.partition_id)
            ipr_metrics = detection_metrics(self.model, secret, self.partition_id,
                                            "fedipr_detection_global")
            extra_loss = regulariser(secret, self.cfg.fedipr_margin)
        if self.cfg.dp_sgd:
            metrics, history = train_local_dp(
                self.model, self.train, self.cfg, steps=steps,
                pad_id=self.tokenizer.pad_token_id, seed=seed,
                prior_history=load_dp_history(self.context, self.partition_id), desc=desc,
                extra_loss=extra_loss)
            save_dp_history(self.context, self.partition_id, history)
        else:
            metrics = train_local(self.model, self.train, self.cfg, steps=steps,
                                  pad_id=self.tokenizer.pad_token_id, seed=seed,
                                  prox_reference=prox, desc=desc, extra_loss=extra_loss)
        if self.cfg.fedipr:
            metrics.update(ipr_metrics)
            metrics.update(detection_metrics(self.model, secret, self.partition_id,
                                             "fedipr_detection_local"))
        metrics["partition-id"] = self.partition_id
        metrics["local_steps"] = steps
        return (to_wire(get_trainable_state(self.model), self.cfg.wire_dtype), len(self.train),
                metrics)

    def evaluate(self, parameters, config):
        set_trainable_state(self.model, fit_to_model(self.model, parameters, self.cfg.lora_alpha))
        if len(self.val) == 0:
            return float("nan"), 0, {"partition-id": self.partition_id}
        metrics = evaluate_model(self.model, self.tokenizer, self.val_raw, self.val,
                                 self.task_data, self.cfg)
        loss = metrics.pop("loss")
        if self.cfg.fedipr:  # this round's global model against the node's own secret
            from .fedipr import detection_metrics, node_secret

            metrics.update(detection_metrics(
                self.model, node_secret(self.cfg, self.model, self.context, self.partition_id),
                self.partition_id))
        return float(loss), len(self.val), {**metrics, "partition-id": self.partition_id}
