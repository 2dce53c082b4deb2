"""Offsite-tuning's wire format (Xiao et al. 2023, arXiv 2302.04870), imported by both sides.

Fit/evaluate config keys; the frozen emulator as its own records (sent once per node,
kept in the node's ``context.state``); the named-tensor <-> array conversion both sides
use for the adapter blocks (the only arrays in ``Parameters``).
The protocol is explained in :mod:`fatellm_flwr.strategies.offsite`.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from .common import NODE_RECORD_PREFIX

# ------------------------------------------------------------------ protocol (fit/eval config)
KEY_NUM_LAYERS = "offsite-num-layers"  # depth L of the server's full model
KEY_EMULATOR_ID = "offsite-emulator-id"  # content hash of architecture + frozen tensors
KEY_ARCH = "offsite-arch"  # JSON of the emulator's transformers config (to_dict)
KEY_ADAPTER_NAMES = "offsite-adapter-names"  # JSON list: names of the adapter arrays, in order
KEY_FROZEN_COUNT = "offsite-frozen-count"  # frozen tensors in this message's emulator record
METRIC_NEED_EMULATOR = "offsite-need-emulator"  # client reply: "send me the frozen part"

# the frozen emulator: its own records in the node's first fit message, kept in the node's
# context.state (moved there by the client's node_records_mod)
EMULATOR_ARRAYS = NODE_RECORD_PREFIX + "offsite-emulator"  # ArrayRecord: name -> tensor
EMULATOR_META = NODE_RECORD_PREFIX + "offsite-emulator-meta"  # ConfigRecord: id, names


def arch_config(arch_json: str):
    """The transformers config of the emulator from its JSON (``config.to_json_string``)."""
    from transformers import CONFIG_MAPPING

    data = json.loads(arch_json)
    return CONFIG_MAPPING[data["model_type"]].from_dict(data)


def emulator_records(emulator_id: str, frozen: dict[str, np.ndarray]
                     ) -> dict[str, ArrayRecord | ConfigRecord]:
    """The frozen part of the emulator as the records that travel to a node once."""
    arrays = ArrayRecord(array_dict=OrderedDict(
        (n, Array(np.ascontiguousarray(a))) for n, a in frozen.items()))
    meta = ConfigRecord({"id": emulator_id, "names": json.dumps(list(frozen))})
    return {EMULATOR_ARRAYS: arrays, EMULATOR_META: meta}


def records_nbytes(records: dict[str, ArrayRecord | ConfigRecord]) -> int:
    """Bytes of the serialised tensors (and names) in ``records``."""
    total = 0
    for record in records.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(a.data) for a in record.values())
        else:
            total += sum(len(str(v)) for v in record.values())
    return int(total)


def read_emulator_records(state: RecordDict, emulator_id: str
                          ) -> dict[str, np.ndarray] | None:
    """The frozen tensors of emulator ``emulator_id`` held in a node's state, or None."""
    meta = state.config_records.get(EMULATOR_META)
    if meta is None or str(meta["id"]) != emulator_id or EMULATOR_ARRAYS not in \
            state.array_records:
        return None
    rec = state.array_records[EMULATOR_ARRAYS]
    return {name: rec[name].numpy() for name in json.loads(str(meta["names"]))}


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
