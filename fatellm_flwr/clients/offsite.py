"""Offsite-tuning client: tune the adapter blocks of a frozen emulator on local data.

The client never sees the full model: it rebuilds the emulator (bottom adapters, the ``n``
kept middle blocks, top adapters, embeddings, final norm, head) from the architecture
config and the tensors the server sends (:func:`fatellm_flwr.emulator.emulator_from_payload`),
fine-tunes the adapter blocks (fully, or with LoRA merged before sending) and returns the
adapter tensors. The wire protocol is described in
:mod:`fatellm_flwr.strategies.offsite`; its keys and codecs live in
:mod:`fatellm_flwr.wire.offsite`.

Where the frozen part of the emulator is kept between rounds:

- a process cache (one emulator, keyed by the server's emulator id): in the simulation
  engine a client's process lives across rounds, so later rounds reuse the built model;
- the node's Flower ``context.state`` (an ``ArrayRecord`` of the frozen tensors + a
  ``ConfigRecord`` with the id and names, sent by the server as their own records in the
  node's first fit message and moved there by ``node_records_mod``), which persists per
  node across rounds in the simulation engine and in deployment, where each round runs in
  a fresh process;
- neither (a node whose state was lost): the client answers with the metric
  ``offsite-need-emulator`` = 1 and no arrays; the server leaves it out of that round's
  aggregate and sends it the frozen part again next round.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch
from flwr.app import Context
from flwr.client import NumPyClient
from torch import nn

from ..config import Config
from ..device import resolve_device
from ..emulator import (
    OffsiteSplit,
    decoder_blocks,
    emulator_from_payload,
    mark_adapters_trainable,
    merge_lora,
)
from ..metrics import evaluate_model
from ..models import build_peft_config, cached_tokenizer
from ..train import num_local_steps, train_local, train_local_dp
from ..wire.common import KEY_SERVER_ROUND, to_wire
from ..wire.offsite import (
    KEY_ADAPTER_NAMES,
    KEY_ARCH,
    KEY_EMULATOR_ID,
    KEY_NUM_LAYERS,
    METRIC_NEED_EMULATOR,
    arch_config,
    get_named,
    read_emulator_records,
    set_named,
)
from .datasets import client_datasets
from .node_state import load_dp_history, save_dp_history

_EMULATORS: dict[str, nn.Module] = {}  # emulator id -> built emulator (one per process)


def clear_emulator_cache() -> None:
    _EMULATORS.clear()


class OffsiteClient(NumPyClient):
    """Receives the adapters (the frozen emulator arrives once, in node state), tunes them."""

    def __init__(self, cfg: Config, partition_id: int, num_partitions: int,
                 context: Context | None = None):
        self.cfg = cfg
        self.context = context
        self.partition_id = partition_id
        # tokenizer files only: the full model's weights never load here
        self.tokenizer = cached_tokenizer(cfg.model, cfg.gguf_file)
        self.task_data, self.train, self.val_raw, self.val = client_datasets(
            cfg, self.tokenizer, partition_id, num_partitions)

    # ------------------------------------------------------------------ emulator
    def _split(self, config) -> OffsiteSplit:
        return OffsiteSplit(int(config[KEY_NUM_LAYERS]), self.cfg.offsite_bottom,
                            self.cfg.offsite_top, self.cfg.offsite_emulator_layers)

    def _from_state(self, eid: str) -> dict[str, np.ndarray] | None:
        """The frozen tensors the server sent this node (``node_records_mod`` keeps them in
        ``context.state``), or None."""
        if self.context is None:
            return None
        return read_emulator_records(self.context.state, eid)

    def emulator(self, parameters, config) -> tuple[nn.Module, OffsiteSplit, list,
                                                    list[str]] | None:
        """``(emulator, split, adapter arrays, adapter names)``, or None when this node holds
        no copy of the frozen part (in its process cache or its ``context.state``)."""
        adapters = list(parameters)
        eid = str(config[KEY_EMULATOR_ID])
        names = json.loads(str(config[KEY_ADAPTER_NAMES]))
        split = self._split(config)
        if eid not in _EMULATORS:
            stored = self._from_state(eid)
            if stored is None:
                return None
            payload = {n: torch.from_numpy(np.asarray(a, dtype=np.float32)) for n, a in
                       stored.items()}
            payload.update({n: torch.from_numpy(np.asarray(a, dtype=np.float32)) for n, a in
                            zip(names, adapters)})
            model = emulator_from_payload(arch_config(str(config[KEY_ARCH])), payload)
            model = model.to(resolve_device(self.cfg.device))
            for p in model.parameters():
                p.requires_grad_(False)
            _EMULATORS.clear()  # one emulator per process
            _EMULATORS[eid] = model
        model = _EMULATORS[eid]
        depth = len(decoder_blocks(model))
        if depth != split.emulator_size:
            raise ValueError(f"the emulator has {depth} blocks but offsite-bottom/top/"
                             f"emulator-layers give {split.emulator_size}: the client's run "
                             "config differs from the server's")
        set_named(model, names, adapters)
        return model, split, adapters, names

    # ------------------------------------------------------------------ Flower API
    def get_parameters(self, config) -> list[np.ndarray]:
        return []  # the server initialises the adapters from its own model

    def fit(self, parameters, config):
        got = self.emulator(parameters, config)
        if got is None:
            return [], 0, {METRIC_NEED_EMULATOR: 1.0, "partition-id": self.partition_id}
        if self.partition_id in self.cfg.failing_partitions:
            raise RuntimeError(f"injected failure of partition {self.partition_id} "
                               "(fail-partitions)")
        model, split, _, names = got
        server_round = int(config.get(KEY_SERVER_ROUND, 1))
        steps = num_local_steps(self.cfg, len(self.train))
        seed = self.cfg.seed + 1000 * server_round + self.partition_id
        torch.manual_seed(seed)
        train_model = model
        if self.cfg.offsite_lora:
            from peft import get_peft_model

            peft_cfg = build_peft_config(self.cfg.replace(peft_method="lora"), model)
            peft_cfg = dataclasses.replace(
                peft_cfg, layers_to_transform=split.emulator_adapter_positions())
            train_model = get_peft_model(model, peft_cfg)
        else:
            mark_adapters_trainable(model, split)
        trainable = sum(p.numel() for p in train_model.parameters() if p.requires_grad)
        desc = f"client {self.partition_id} round {server_round}"
        try:
            if self.cfg.dp_sgd:
                metrics, history = train_local_dp(
                    train_model, self.train, self.cfg, steps=steps,
                    pad_id=self.tokenizer.pad_token_id, seed=seed,
                    prior_history=load_dp_history(self.context, self.partition_id), desc=desc)
                save_dp_history(self.context, self.partition_id, history)
            else:
                prox = None
                if self.cfg.proximal_mu > 0:
                    prox = [p.detach().clone() for p in train_model.parameters()
                            if p.requires_grad]
                metrics = train_local(train_model, self.train, self.cfg, steps=steps,
                                      pad_id=self.tokenizer.pad_token_id, seed=seed,
                                      prox_reference=prox, desc=desc)
        except BaseException:
            _EMULATORS.clear()  # the cached model may be half-trained or still LoRA-wrapped
            raise
        if self.cfg.offsite_lora:
            merge_lora(train_model)  # folds B @ A into `model`'s adapter-block weights
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        metrics.update({"partition-id": self.partition_id, "local_steps": steps,
                        "trainable_params": float(trainable)})
        return to_wire(get_named(model, names), self.cfg.wire_dtype), len(self.train), metrics

    def evaluate(self, parameters, config):
        got = self.emulator(parameters, config)
        if got is None or len(self.val) == 0:
            return float("nan"), 0, {"partition-id": self.partition_id}
        model = got[0]
        metrics = evaluate_model(model, self.tokenizer, self.val_raw, self.val, self.task_data,
                                 self.cfg)
        loss = metrics.pop("loss")
        return float(loss), len(self.val), {**metrics, "partition-id": self.partition_id}
