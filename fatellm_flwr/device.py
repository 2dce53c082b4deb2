"""Where models and batches live: the ``device`` key (auto, cpu, cuda, cuda:N, mps).

``auto`` picks CUDA when present (then MPS), else the CPU. An explicit GPU that this machine
lacks is an error naming what was asked and what exists, never a silent fall-back to CPU.
The run config's ``device`` is shared by every party; a SuperNode may override it with
``device=...`` in its own node config (each organisation knows its hardware).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N (N = GPU index), mps"
_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class DeviceError(RuntimeError):
    """A requested device this machine does not have."""


def check_device_spec(spec: str) -> str:
    """``spec`` if it is a well-formed device name (no hardware check), else ValueError."""
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise ValueError(f"device {spec!r} is not allowed; allowed: {DEVICE_CHOICES}")
    return spec


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str = "auto") -> torch.device:
    """The :class:`torch.device` for ``spec`` on this machine.

    Raises :class:`DeviceError` when ``spec`` names hardware that is not present (e.g.
    ``cuda`` without a CUDA build/GPU, ``cuda:3`` on a 2-GPU node, ``mps`` off Apple).
    """
    check_device_spec(spec)
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise DeviceError("device='mps' but this machine has no usable Apple MPS backend; "
                              "use device='cpu' or 'auto'")
        return torch.device("mps")
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA GPU is visible (check drivers / CUDA_VISIBLE_DEVICES)")
        raise DeviceError(f"device={spec!r} but {why} (torch {torch.__version__}); use "
                          "device='cpu' or 'auto'")
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device={spec!r} but this machine has {count} CUDA GPU(s): "
                          f"cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def node_device(run_device: str, node_config: Mapping[str, Any] | None) -> str:
    """The device spec for this node: node config ``device`` overrides the run config's."""
    value = (node_config or {}).get("device")
    if value is None or str(value) == "":
        return run_device
    try:
        return check_device_spec(str(value))
    except ValueError as e:
        raise DeviceError(f"node config: {e}") from e


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a parameter-less module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """A copy of ``batch`` with every tensor moved to ``device`` (others untouched)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def is_quantized(model: nn.Module) -> bool:
    """True for bitsandbytes-quantized models (placed by ``device_map`` at load time)."""
    return bool(getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None)
                or getattr(model, "is_loaded_in_4bit", False)
                or getattr(model, "is_loaded_in_8bit", False))


def place_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Move ``model`` to ``device`` (quantized models stay where ``device_map`` put them)."""
    if is_quantized(model):
        return model
    return model.to(device)


def device_summary(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H100, 80.0 GiB)`` / ``cpu`` for logs."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    return str(device)
