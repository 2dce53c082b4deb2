"""Load any Hugging Face causal LM, quantize it, wrap it with PEFT, move trainable state.

One loader and one PEFT builder serve every algorithm. LoRA/IA3 target modules are found
from the model's own linear layers (FATE-LLM's per-family table is what broke Qwen), and
only trainable tensors travel: named, in a stable order, as float32 numpy arrays.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import Config

log = logging.getLogger(__name__)
# bitsandbytes' 8-bit matmul warns on every call that fp32 inputs are cast to fp16
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model reference that cannot be loaded, with the reason and what to do."""


# --------------------------------------------------------------------------- loading
def check_quantization_support(quantization: str) -> None:
    """Fail early, with what is needed, when bitsandbytes can't run ``quantization`` here."""
    if quantization == "none":
        return
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
        raise ModelLoadError(
            f"quantization={quantization!r} needs the bitsandbytes package "
            f"(pip install 'bitsandbytes>=0.45'): {e}") from e
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:  # a 16x16 probe layer: the cheapest honest check that the kernels exist here
        if quantization == "4bit":
            layer = bnb.nn.Linear4bit(16, 16, compute_dtype=torch.float32, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False)
        layer = layer.to(device)
        layer(torch.randn(2, 16, device=device))
    except Exception as e:
        raise ModelLoadError(
            f"quantization={quantization!r} is not supported by bitsandbytes "
            f"{bnb.__version__} on {device}: {type(e).__name__}: {e}. It needs a CUDA GPU, "
            f"or bitsandbytes>=0.46 with CPU kernels; use quantization='none' otherwise."
        ) from e


@functools.lru_cache(maxsize=1)
def cached_tokenizer(model_ref: str, gguf_file: str = ""):
    """:func:`load_tokenizer`, kept per process: for clients that never load the model's
    weights (FedKSeed rebuilds them itself; offsite-tuning clients get an emulator)."""
    return load_tokenizer(model_ref, gguf_file)


def load_tokenizer(model_ref: str, gguf_file: str = ""):
    """The tokenizer of ``model_ref`` with a pad token and right padding."""
    from transformers import AutoTokenizer

    from .assets import resolve_model_ref

    path = resolve_model_ref(model_ref)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(model_ref, e, path) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_base_model(model_ref: str, gguf_file: str = "", quantization: str = "none",
                    dtype: str = "float32", device: str = "cpu") -> nn.Module:
    """Load a causal LM by hub id, local folder, or ``builtin:<name>``, optionally quantized,
    and place it on ``device`` (a spec of :func:`~fatellm_flwr.device.resolve_device`;
    quantized models are placed by bitsandbytes' ``device_map`` on CUDA)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .assets import resolve_model_ref
    from .device import place_model, resolve_device

    dev = resolve_device(device)
    check_quantization_support(quantization)
    path = resolve_model_ref(model_ref)
    kwargs: dict = {"dtype": _DTYPES[dtype]}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["dtype"] = torch.float32
    elif quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32 if dev.type != "cuda"
            else _DTYPES[dtype] if dtype != "float32" else torch.bfloat16)
    if quantization != "none" and dev.type == "cuda":
        kwargs["device_map"] = {"": dev.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(model_ref, e, path) from e
    model = place_model(model, dev)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = model.config.eos_token_id
    return model


def _load_error(model_ref: str, e: Exception, path: str = "") -> ModelLoadError:
    """What went wrong loading ``model_ref`` (resolved to ``path``): a broken local folder,
    or a reference that is neither a folder nor reachable on the hub."""
    cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    folder = Path(path or model_ref)
    if folder.is_dir():
        config = folder / "config.json"
        if not config.is_file():
            what = (f"it has no config.json (files: "
                    f"{', '.join(sorted(p.name for p in folder.iterdir())[:10]) or 'none'})")
        else:
            try:
                json.loads(config.read_text(encoding="utf-8"))
                what = f"transformers could not load it ({cause})"
            except (ValueError, UnicodeDecodeError) as bad:
                what = f"its config.json is broken: {type(bad).__name__}: {bad}"
        return ModelLoadError(f"could not load model {model_ref!r}: the local folder "
                              f"{str(folder)!r} exists but {what}. Fix the file or re-save the "
                              "model with save_pretrained.")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    where = ("it is not a local folder and the Hugging Face Hub is offline (HF_HUB_OFFLINE=1)"
             if offline else "it is neither a local folder nor a reachable hub id")
    return ModelLoadError(
        f"could not load model {model_ref!r}: {where}. Use a local folder, a hub id while "
        f"online, or a builtin such as 'builtin:smollm2-135m-instruct'. ({cause})")


# --------------------------------------------------------------------------- PEFT
def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    types: list[type] = [nn.Linear, Conv1D]
    try:
        import bitsandbytes as bnb

        types += [bnb.nn.Linear8bitLt, bnb.nn.Linear4bit]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def find_target_modules(model: nn.Module) -> list[str]:
    """Names (last path component) of the linear layers inside the transformer blocks.

    Works from the modules themselves: ``nn.Linear``, GPT-2's ``Conv1D`` and bitsandbytes'
    quantized linears, excluding the output head. Sorted, so the result is stable.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
             if isinstance(mod, _linear_types()) and mod is not head and "." in name}
    names.discard("lm_head")
    if not names:
        raise ValueError(f"found no linear layers to adapt in {type(model).__name__}; "
                         "set target-modules explicitly")
    return sorted(names)


def _in_out(mod: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer (GPT-2's Conv1D stores (in, out))."""
    w = mod.weight
    if type(mod).__name__ == "Conv1D":
        return int(w.shape[0]), int(w.shape[1])
    return (int(getattr(mod, "in_features", w.shape[-1])),
            int(getattr(mod, "out_features", w.shape[0])))


_INTERMEDIATE_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff")


def _intermediate_size(config) -> int | None:
    """The MLP's hidden width from the model config, when it names one."""
    for key in _INTERMEDIATE_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _is_down_projection(mod: nn.Module, parent: nn.Module, intermediate: int | None) -> bool:
    """Is ``mod`` the MLP's down projection: a narrowing linear layer next to (same parent)
    the up projection that maps back exactly (``up: d -> m``, ``down: m -> d``), with ``m``
    the config's intermediate size when it has one. Attention's k/v projections of
    grouped-query attention also narrow (576 -> 192 in SmolLM2) but have no such partner."""
    in_f, out_f = _in_out(mod)
    if in_f <= out_f or (intermediate is not None and in_f != intermediate):
        return False
    return any(other is not mod and isinstance(other, _linear_types())
               and _in_out(other) == (out_f, in_f) for other in parent.children())


def _down_projections(model: nn.Module, instances: dict[str, nn.Module]) -> set[str]:
    """The names among ``instances`` (name -> linear layer) that are MLP down projections."""
    intermediate = _intermediate_size(getattr(model, "config", None))
    return {n for n, mod in instances.items()
            if _is_down_projection(mod, model.get_submodule(n.rpartition(".")[0]), intermediate)}


def _ia3_feedforward(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Name suffixes (peft matches with ``key.endswith``) of the targets that are feed-forward
    down projections, whose *input* IA3 scales (Liu et al. 2022, "Few-Shot
    Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning").

    peft's own table (``TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING``) when it
    knows the model type, else found from the structure (:func:`_is_down_projection`). A
    short name is used when every instance of it is feed-forward, else ``parent.name``
    (GPT-2's ``c_proj`` is both the attention output and the MLP down projection).
    """
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_FF

    config = getattr(model, "config", None)
    instances = {name: mod for name, mod in model.named_modules()
                 if name.rsplit(".", 1)[-1] in targets and isinstance(mod, _linear_types())}
    known = PEFT_FF.get(getattr(config, "model_type", None))
    if known is not None:
        ff = {n for n in instances if any(n.endswith(k) for k in known)}
    else:
        ff = _down_projections(model, instances)
    suffixes: set[str] = set()
    for name in ff:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(n.endswith(suffix) for n in instances if n not in ff):
                suffixes.add(suffix)
                break
    return sorted(suffixes)


def _fedipr_modules(cfg: Config, model: nn.Module) -> list[str] | None:
    """FedIPR's carriers: the norm layers of the last ``fedipr-blocks`` blocks, made trainable
    (and saved with the adapter) through peft's ``modules_to_save``; None when FedIPR is off
    or the LoRA products carry the signatures (``fedipr-carriers=lora``)."""
    if not getattr(cfg, "fedipr", False) or getattr(cfg, "fedipr_carriers", "norm") == "lora":
        return None
    from .privacy.fedipr import block_norm_names

    return block_norm_names(model, cfg.fedipr_blocks)


def _last_layers(cfg: Config, model: nn.Module) -> dict:
    """peft's ``layers_to_transform``/``layers_pattern`` for ``peft-last-layers`` (the block
    list found generically, as offsite-tuning finds it), or nothing when it is 0."""
    if not cfg.peft_last_layers:
        return {}
    from .emulator import blocks_prefix, decoder_blocks

    depth = len(decoder_blocks(model))
    if cfg.peft_last_layers > depth:
        raise ValueError(f"peft-last-layers={cfg.peft_last_layers} exceeds the "
                         f"{depth} decoder blocks of {type(model).__name__}; allowed: 0 "
                         f"(all) to {depth}")
    return {"layers_to_transform": list(range(depth - cfg.peft_last_layers, depth)),
            "layers_pattern": blocks_prefix(model).rsplit(".", 1)[-1]}


def build_peft_config(cfg: Config, model: nn.Module):
    """The peft ``*Config`` for ``cfg.peft_method``, with targets found from the model."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    if cfg.peft_method in ("lora", "ia3"):
        found = find_target_modules(model)
        targets = cfg.target_module_list or found
        missing = [t for t in targets if t not in found]
        if missing:
            raise ValueError(
                f"target-modules {missing} not found in {type(model).__name__}; "
                f"its linear layers are: {', '.join(found)}")
        if cfg.peft_method == "lora":
            fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in model.modules())
            return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora_r,
                              lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=targets, fan_in_fan_out=fan_in_fan_out,
                              modules_to_save=_fedipr_modules(cfg, model),
                              **_last_layers(cfg, model))
        ff = _ia3_feedforward(model, targets)
        # peft wants the feed-forward names among the targets (`mlp.c_proj` matches no module
        # that `c_proj` does not)
        return IA3Config(task_type=TaskType.CAUSAL_LM,
                         target_modules=sorted(set(targets) | set(ff)), feedforward_modules=ff,
                         modules_to_save=_fedipr_modules(cfg, model))
    if cfg.peft_method == "prompt-tuning":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                  num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.peft_method == "prefix-tuning":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                  num_virtual_tokens=cfg.num_virtual_tokens)
    raise ValueError(f"unknown peft-method {cfg.peft_method!r}")


def wrap_peft(model: nn.Module, cfg: Config, quantization: str = "none"):
    """Wrap a base model with the configured PEFT method (k-bit preparation for QLoRA)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantization != "none":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    peft_model = get_peft_model(model, build_peft_config(cfg, model))
    return peft_model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' own gradient checkpointing (non-reentrant), with input gradients on so
    that a frozen embedding still lets gradients reach adapters inside checkpointed blocks."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient-checkpointing=true: {type(model).__name__} does not "
                         "support gradient checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False


_CACHE: dict[tuple, tuple] = {}


def load_peft_model(cfg: Config):
    """``(peft_model, tokenizer)`` for ``cfg``, cached per process.

    In the simulation engine several clients share one process: the wrapped model is
    reused, and every fit overwrites its whole trainable state, so a round never reloads
    weights from disk. The seed fixes the adapters' initial values on every process.
    """
    key = (cfg.model, cfg.gguf_file, cfg.quantization, cfg.dtype, cfg.peft_method, cfg.lora_r,
           cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, cfg.num_virtual_tokens,
           cfg.seed, cfg.device, cfg.gradient_checkpointing, cfg.fedipr, cfg.fedipr_blocks,
           cfg.fedipr_carriers, cfg.peft_last_layers)
    if key not in _CACHE:
        tokenizer = load_tokenizer(cfg.model, cfg.gguf_file)
        base = load_base_model(cfg.model, cfg.gguf_file, cfg.quantization, cfg.dtype,
                               cfg.device)
        torch.manual_seed(cfg.seed)
        _CACHE.clear()  # one model per process: never hold two LLMs in memory
        _CACHE[key] = (wrap_peft(base, cfg, cfg.quantization), tokenizer)
    return _CACHE[key]


def clear_model_cache() -> None:
    _CACHE.clear()


# --------------------------------------------------------------------------- state
def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in the model's own (stable) order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def get_trainable_state(model: nn.Module) -> list[np.ndarray]:
    """The trainable parameters as float32 arrays, in :func:`trainable_names` order."""
    return [p.detach().to("cpu", torch.float32).numpy().copy()
            for _, p in model.named_parameters() if p.requires_grad]


def set_trainable_state(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    """Write arrays (in :func:`trainable_names` order) into the trainable parameters."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if len(arrays) != len(params):
        raise ValueError(f"expected {len(params)} trainable arrays, got {len(arrays)}")
    with torch.no_grad():
        for (name, p), a in zip(params, arrays):
            if tuple(a.shape) != tuple(p.shape):
                raise ValueError(f"array for {name!r} has shape {tuple(a.shape)}, "
                                 f"expected {tuple(p.shape)}")
            p.copy_(torch.as_tensor(np.asarray(a), dtype=p.dtype, device=p.device))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (quantized weights counted unpacked)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") or type(p).__name__ == "Params4bit":
            n *= 2  # 4-bit weights pack two values per byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def save_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """Save a PEFT model's adapter with ``save_pretrained``, atomically (tmp dir + rename)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
