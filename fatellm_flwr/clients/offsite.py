"""Offsite-tuning client: tune the adapter blocks of a frozen emulator on local data.

The client never sees the full model: it rebuilds the emulator (bottom adapters, the ``n``
kept middle blocks, top adapters, embeddings, final norm, head) from the architecture
config and the tensors the server sends (:func:`fatellm_flwr.emulator.emulator_from_payload`),
fine-tunes the adapter blocks (fully, or with LoRA merged before sending) and returns the
adapter tensors. The wire protocol is described in :mod:`fatellm_flwr.strategies.offsite`.

Where the frozen part of the emulator is kept between rounds:

- a process cache (one emulator, keyed by the server's emulator id): in the simulation
  engine a client's process lives across rounds, so later rounds reuse the built model;
- the node's Flower ``context.state`` (an ``ArrayRecord`` of the frozen tensors + a
  ``ConfigRecord`` with the id and names), which persists per node across rounds in the
  simulation engine and in deployment, where each round runs in a fresh process;
- neither (a node whose state was lost): the client answers with the metric
  ``offsite-need-emulator`` = 1 and no arrays; the server leaves it out of that round's
  aggregate and sends it the frozen part again next round.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.client import NumPyClient
from torch import nn

from ..config import Config
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
from .homo import client_datasets, load_dp_history, save_dp_history

# ------------------------------------------------------------------ protocol (fit/eval config)
KEY_NUM_LAYERS = "offsite-num-layers"  # depth L of the server's full model
KEY_EMULATOR_ID = "offsite-emulator-id"  # content hash of architecture + frozen tensors
KEY_ARCH = "offsite-arch"  # JSON of the emulator's transformers config (to_dict)
KEY_ADAPTER_NAMES = "offsite-adapter-names"  # JSON list: names of the adapter arrays, in order
KEY_FROZEN_COUNT = "offsite-frozen-count"  # frozen arrays appended after the adapters (or 0)
KEY_FROZEN_NAMES = "offsite-frozen-names"  # JSON list of their names (only when count > 0)
METRIC_NEED_EMULATOR = "offsite-need-emulator"  # client reply: "send me the frozen part"

STATE_ARRAYS = "fatellm.offsite-emulator"
STATE_META = "fatellm.offsite-emulator-meta"

_EMULATORS: dict[str, nn.Module] = {}  # emulator id -> built emulator (one per process)


def arch_config(arch_json: str):
    """The transformers config of the emulator from its JSON (``config.to_json_string``)."""
    from transformers import CONFIG_MAPPING

    data = json.loads(arch_json)
    return CONFIG_MAPPING[data["model_type"]].from_dict(data)


def split_arrays(parameters: list[np.ndarray], config) -> tuple[list, list]:
    """``(adapter arrays, frozen arrays)`` of a fit/evaluate message."""
    n_frozen = int(config.get(KEY_FROZEN_COUNT, 0))
    if n_frozen < 0 or n_frozen > len(parameters):
        raise ValueError(f"{KEY_FROZEN_COUNT}={n_frozen} does not fit the {len(parameters)} "
                         "arrays received")
    cut = len(parameters) - n_frozen
    return list(parameters[:cut]), list(parameters[cut:])


def set_named(model: nn.Module, names: list[str], arrays) -> None:
    """Copy arrays (numpy or torch) into the parameters ``names`` of ``model`` (shapes checked)."""
    if len(names) != len(arrays):
        raise ValueError(f"got {len(arrays)} adapter arrays for {len(names)} adapter tensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, a in zip(names, arrays):
            p = params[name]
            t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
            if tuple(p.shape) != tuple(t.shape):
                raise ValueError(f"array for {name!r} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(p.shape)}")
            p.copy_(t.to(dtype=p.dtype, device=p.device))


def get_named(model: nn.Module, names: list[str]) -> list[np.ndarray]:
    params = dict(model.named_parameters())
    return [params[n].detach().to("cpu", torch.float32).numpy().copy() for n in names]


def clear_emulator_cache() -> None:
    _EMULATORS.clear()


class OffsiteClient(NumPyClient):
    """Receives adapters (+ the frozen emulator when it lacks it), tunes the adapters."""

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
        if self.context is None:
            return None
        meta = self.context.state.config_records.get(STATE_META)
        if meta is None or str(meta["id"]) != eid:
            return None
        rec = self.context.state.array_records[STATE_ARRAYS]
        return {name: rec[name].numpy() for name in json.loads(str(meta["names"]))}

    def _to_state(self, eid: str, frozen: dict[str, np.ndarray]) -> None:
        if self.context is None:
            return
        self.context.state.array_records[STATE_ARRAYS] = ArrayRecord(
            array_dict=OrderedDict((n, Array(np.ascontiguousarray(a))) for n, a in
                                   frozen.items()))
        self.context.state.config_records[STATE_META] = ConfigRecord(
            {"id": eid, "names": json.dumps(list(frozen))})

    def emulator(self, parameters, config) -> tuple[nn.Module, OffsiteSplit, list,
                                                    list[str]] | None:
        """``(emulator, split, adapter arrays, adapter names)``, or None when this node holds
        no copy of the frozen part and the message does not carry it."""
        adapters, frozen = split_arrays(parameters, config)
        eid = str(config[KEY_EMULATOR_ID])
        names = json.loads(str(config[KEY_ADAPTER_NAMES]))
        split = self._split(config)
        if eid not in _EMULATORS:
            if frozen:
                frozen_names = json.loads(str(config[KEY_FROZEN_NAMES]))
                if len(frozen_names) != len(frozen):
                    raise ValueError(f"{len(frozen)} frozen arrays for {len(frozen_names)} "
                                     "frozen names")
                stored = dict(zip(frozen_names, frozen))
                self._to_state(eid, stored)
            else:
                stored = self._from_state(eid)
                if stored is None:
                    return None
            payload = {n: torch.from_numpy(np.asarray(a, dtype=np.float32)) for n, a in
                       stored.items()}
            payload.update({n: torch.from_numpy(np.asarray(a, dtype=np.float32)) for n, a in
                            zip(names, adapters)})
            model = emulator_from_payload(arch_config(str(config[KEY_ARCH])), payload)
            for p in model.parameters():
                p.requires_grad_(False)
            _EMULATORS.clear()  # one emulator per process
            _EMULATORS[eid] = model
        elif frozen and self._from_state(eid) is None:  # another node of this process built it
            self._to_state(eid, dict(zip(json.loads(str(config[KEY_FROZEN_NAMES])), frozen)))
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
        server_round = int(config.get("server-round", 1))
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
        return get_named(model, names), len(self.train), metrics

    def evaluate(self, parameters, config):
        got = self.emulator(parameters, config)
        if got is None or len(self.val) == 0:
            return float("nan"), 0, {"partition-id": self.partition_id}
        model = got[0]
        metrics = evaluate_model(model, self.tokenizer, self.val_raw, self.val, self.task_data,
                                 self.cfg)
        loss = metrics.pop("loss")
        return float(loss), len(self.val), {**metrics, "partition-id": self.partition_id}
