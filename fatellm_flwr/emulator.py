"""Offsite-tuning core: adapters, layer-drop emulator, payload, plug-in, distillation.

Xiao, Lin, Han 2023, "Offsite-Tuning: Transfer Learning without Full Model" (arXiv 2302.04870).
The model owner keeps the full decoder of ``L`` blocks. The bottom ``a`` and top ``b`` blocks
are the *adapters* (trained by the data owner); the ``L - a - b`` middle blocks are replaced by a
frozen, lossy-compressed *emulator* of ``n`` blocks picked at a fixed stride (uniform layer drop,
Sec. 3.2), optionally distilled (Sec. 3.3) so it mimics the dropped middle. Clients receive
embeddings (and position embeddings), final norm, LM head, adapters and emulator, never the
dropped blocks; they tune the adapters and the owner plugs them back into the full model.

Pure torch/transformers, no Flower import: the Flower strategy and client translate messages only.
Fixes two FATE-LLM bugs: the emulator never duplicates blocks (``n`` is bounded by the middle
size), and untied LM heads (e.g. LLaMA) travel in the payload like everything else.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "OffsiteSplit",
    "adapter_parameter_names",
    "adapter_state",
    "blocks_prefix",
    "build_emulator",
    "client_payload",
    "decoder_blocks",
    "distill_emulator",
    "emulator_frozen_names",
    "emulator_from_payload",
    "mark_adapters_trainable",
    "merge_lora",
    "per_layer_keys",
    "plug_in",
    "set_decoder_blocks",
]

# Config attribute recording, for each emulator block, its index in the full model.
KEPT_LAYERS_ATTR = "offsite_kept_layers"


# ----------------------------------------------------------------------------- block access


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (PeftModel -> base_model.model), else itself."""
    return model.get_base_model() if _is_peft(model) else model


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def _find_blocks(inner: nn.Module) -> str | None:
    """Dotted path of the decoder block list, found from the modules themselves.

    The candidates are ``nn.ModuleList``s whose entries are all of one (non-leaf-layer) class
    and that hold two or more of them, or exactly the config's depth (GPT-NeoX
    ``gpt_neox.layers``, MPT ``transformer.blocks``, Llama ``model.layers``, GPT-2
    ``transformer.h``, OPT ``model.decoder.layers``, ...). One whose length is the config's
    ``num_hidden_layers`` wins (not a longer list of MoE experts); then the longest; then the
    shallowest path. Embeddings, final norm and head need no finding: the emulator is a copy
    of the whole model with only dropped blocks left out.
    """
    depth = getattr(getattr(inner, "config", None), "num_hidden_layers", None)
    best: tuple | None = None
    for name, module in inner.named_modules():
        if not name or not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(block) for block in module}
        if len(kinds) != 1 or next(iter(kinds)) in (nn.Linear, nn.Embedding, nn.LayerNorm):
            continue
        if len(module) < 2 and len(module) != depth:
            continue
        rank = (len(module) == depth, len(module), -name.count("."))
        if best is None or rank > best[0]:
            best = (rank, name)
    return None if best is None else best[1]


def blocks_prefix(model: nn.Module) -> str:
    """Dotted path of the decoder block list in ``model`` (e.g. ``"model.layers"``).

    Found generically by :func:`_find_blocks`; for a peft-wrapped model this is the path inside
    the unwrapped transformers model.
    """
    inner = _unwrap(model)
    path = _find_blocks(inner)
    if path is None:
        raise TypeError(
            f"cannot find the decoder blocks of {type(inner).__name__}: it has no nn.ModuleList "
            "of identical blocks (supported layouts: any decoder-only causal LM whose blocks sit "
            "in one ModuleList, e.g. `model.layers`, `transformer.h`, `gpt_neox.layers`, "
            "`transformer.blocks`, `model.decoder.layers`; optionally wrapped by peft)"
        )
    return path


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of transformer blocks of a decoder-only causal LM (peft-aware)."""
    return _get_path(_unwrap(model), blocks_prefix(model))  # type: ignore[return-value]


def set_decoder_blocks(model: nn.Module, blocks: nn.ModuleList | list[nn.Module]) -> None:
    """Replace the block list of ``model`` (peft-aware). Does not touch the config."""
    inner = _unwrap(model)
    parent_path, _, attr = blocks_prefix(model).rpartition(".")
    parent = _get_path(inner, parent_path)
    setattr(parent, attr, blocks if isinstance(blocks, nn.ModuleList) else nn.ModuleList(blocks))


# ----------------------------------------------------------------------------- the split


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name}={value} is out of range: allowed [{low}, {high}]")
    return value


@dataclass(frozen=True)
class OffsiteSplit:
    """How the ``num_layers`` blocks of the full model are split (paper Sec. 3.1-3.2).

    ``bottom`` (a) and ``top`` (b) blocks are adapters; ``emulator_layers`` (n) of the
    ``L - a - b`` middle blocks form the emulator. Requires ``a + b < L`` (a middle must exist:
    otherwise the client would hold the whole model) and ``0 <= n <= L - a - b``; ``n = 0``
    means the middle is dropped entirely, ``n = L - a - b`` keeps it whole (no compression).
    """

    num_layers: int
    bottom: int = 2
    top: int = 2
    emulator_layers: int = 2

    def __post_init__(self) -> None:
        big = 10**9
        num_layers = _check_int("num_layers", self.num_layers, 1, big)
        bottom = _check_int("bottom (adapter blocks a)", self.bottom, 0, num_layers - 1)
        _check_int("top (adapter blocks b)", self.top, 0, num_layers - 1)
        if bottom + self.top >= num_layers:
            raise ValueError(
                f"bottom + top = {bottom} + {self.top} = {bottom + self.top} must be < num_layers "
                f"= {num_layers} (allowed: bottom + top in [0, {num_layers - 1}]) so that a middle "
                "remains to be dropped/emulated"
            )
        middle = num_layers - bottom - self.top
        _check_int("emulator_layers (n)", self.emulator_layers, 0, middle)

    @property
    def num_middle(self) -> int:
        """Number of middle blocks ``M = L - a - b``."""
        return self.num_layers - self.bottom - self.top

    @property
    def emulator_size(self) -> int:
        """Number of blocks of the emulator model: ``a + n + b``."""
        return self.bottom + self.emulator_layers + self.top

    def middle_indices(self) -> list[int]:
        """Full-model indices of the middle blocks: ``a, ..., L - b - 1``."""
        return list(range(self.bottom, self.num_layers - self.top))

    def emulator_indices(self) -> list[int]:
        """Full-model indices of the ``n`` middle blocks kept in the emulator (uniform drop).

        With ``M`` middle blocks, ``idx_i = a + round_half_up(i * (M - 1) / (n - 1))`` for
        ``i = 0..n-1`` (the paper's fixed stride; first and last middle blocks always kept);
        ``n = 1`` keeps ``a + (M - 1) // 2``; ``n = 0`` keeps none. As the stride
        ``(M - 1) / (n - 1) >= 1`` the indices are strictly increasing: no duplicated blocks.
        """
        n, m, a = self.emulator_layers, self.num_middle, self.bottom
        if n == 0:
            return []
        if n == 1:
            return [a + (m - 1) // 2]
        # integer round-half-up of i*(m-1)/(n-1): floor((2*i*(m-1) + (n-1)) / (2*(n-1)))
        return [a + (2 * i * (m - 1) + (n - 1)) // (2 * (n - 1)) for i in range(n)]

    def dropped_indices(self) -> list[int]:
        """Full-model indices of the middle blocks the client never receives."""
        kept = set(self.emulator_indices())
        return [i for i in self.middle_indices() if i not in kept]

    def adapter_indices(self) -> list[int]:
        """Full-model indices of the adapter blocks: bottom ``a`` then top ``b``."""
        return list(range(self.bottom)) + list(range(self.num_layers - self.top, self.num_layers))

    def kept_indices(self) -> list[int]:
        """Full-model indices of the emulator model's blocks, in order: bottom, emulator, top."""
        return (
            list(range(self.bottom))
            + self.emulator_indices()
            + list(range(self.num_layers - self.top, self.num_layers))
        )

    def emulator_adapter_positions(self) -> list[int]:
        """Positions of the adapter blocks inside the emulator model."""
        n_em = self.emulator_size
        return list(range(self.bottom)) + list(range(n_em - self.top, n_em))

    def emulator_middle_positions(self) -> list[int]:
        """Positions of the emulator (middle) blocks inside the emulator model."""
        return list(range(self.bottom, self.bottom + self.emulator_layers))

    def full_index(self, emulator_position: int) -> int:
        """Full-model index of the block at ``emulator_position`` in the emulator model."""
        return self.kept_indices()[emulator_position]


# ----------------------------------------------------------------------------- emulator model


def _num_layers(model: nn.Module) -> int:
    return len(decoder_blocks(model))


def _check_depth(model: nn.Module, expected: int, what: str) -> None:
    depth = _num_layers(model)
    if depth != expected:
        raise ValueError(f"{what} has {depth} decoder blocks but the split expects {expected}")


# Per-block attributes holding the block's KV-cache slot (Llama/Qwen2/Gemma3/OPT/GPT-NeoX/Falcon/
# Bloom/MPT... ``layer_idx``; GPT-Neo ``layer_id``).
_LAYER_INDEX_ATTRS = ("layer_idx", "layer_id")
# Per-layer config lists that another key encodes in compressed form, rewritten to match:
# GPT-Neo's ``attention_layers`` is expanded from run-length ``attention_types``.
_RUN_LENGTH_KEYS = {"attention_layers": "attention_types"}
# Config keys that are lists but never per-layer (token ids, architecture names, ...).
_NOT_PER_LAYER = frozenset({"architectures", "bad_words_ids", "suppress_tokens",
                            "begin_suppress_tokens", "forced_decoder_ids", "task_specific_params"})


def _fix_layer_metadata(model: nn.Module, full_indices: list[int]) -> None:
    """Renumber per-block metadata after layer drop.

    ``layer_idx``/``layer_id`` (KV-cache slot) becomes the block's new position. GPT-2's
    ``scale_attn_by_inverse_layer_idx`` scaling stays that of the block's *original* index so the
    block computes exactly what it did in the full model. ``layer_type``/``is_sliding``/
    ``attention_type`` need no change: they travel with each block and the config's per-layer
    lists are sliced the same way (:func:`_slice_config`).
    """
    for pos, block in enumerate(decoder_blocks(model)):
        for module in block.modules():
            for attr in _LAYER_INDEX_ATTRS:
                if isinstance(getattr(module, attr, None), int):
                    setattr(module, attr, pos)
            if getattr(module, "scale_attn_by_inverse_layer_idx", False):
                scaling = module.head_dim**-0.5 if module.scale_attn_weights else 1.0
                module.scaling = scaling / float(full_indices[pos] + 1)


def per_layer_keys(config, num_layers: int) -> list[str]:
    """Config keys holding one entry per decoder block (``layer_types``, GPT-Neo's
    ``attention_layers``, per-layer window sizes, ...): every list of ``num_layers`` entries
    that is not a token-id or name list."""
    return sorted(
        k for k, v in config.to_dict().items()
        if isinstance(v, (list, tuple)) and len(v) == num_layers and k not in _NOT_PER_LAYER
        and "token" not in k and k != KEPT_LAYERS_ATTR
    )


def _slice_config(config, full_indices: list[int], num_full: int) -> None:
    """Set depth, every per-layer list and the kept-layer map on an (already copied) config."""
    keys = per_layer_keys(config, num_full)
    config.num_hidden_layers = len(full_indices)  # attribute_map: n_layer, num_layers, n_layers
    for key in keys:
        values = getattr(config, key)
        sliced = [values[i] for i in full_indices]
        setattr(config, key, type(values)(sliced) if isinstance(values, tuple) else sliced)
        if key in _RUN_LENGTH_KEYS and hasattr(config, _RUN_LENGTH_KEYS[key]):
            setattr(config, _RUN_LENGTH_KEYS[key], [[sliced, 1]])
    previous = getattr(config, KEPT_LAYERS_ATTR, None)
    # composing with an earlier layer drop keeps indices relative to the original model
    setattr(
        config,
        KEPT_LAYERS_ATTR,
        [previous[i] for i in full_indices] if previous else list(full_indices),
    )


def build_emulator(full_model: nn.Module, split: OffsiteSplit) -> nn.Module:
    """A new model with blocks ``[bottom adapters] + [emulator] + [top adapters]`` (paper Sec. 3).

    Everything is deep-copied (independent storage; tied heads stay tied inside the copy); the
    dropped middle blocks are never copied. ``config.num_hidden_layers`` and every per-layer list
    (:func:`per_layer_keys`) are sliced, ``config.offsite_kept_layers`` records each block's
    full-model index, per-block ``layer_idx`` is renumbered (KV cache) so forward, backward and
    ``generate`` work. The block list is found generically (:func:`blocks_prefix`), so any
    decoder-only layout works: Llama, GPT-2, OPT, GPT-NeoX, MPT, Falcon, Bloom, Phi, GPT-J, ...
    """
    if _is_peft(full_model):
        raise TypeError("build_emulator needs a plain transformers model; merge_and_unload() first")
    _check_depth(full_model, split.num_layers, "full model")
    kept = split.kept_indices()
    blocks = decoder_blocks(full_model)
    memo: dict[int, object] = {}
    new_config = copy.deepcopy(full_model.config, memo)  # blocks referencing config share the copy
    kept_blocks = nn.ModuleList([blocks[i] for i in kept])
    memo[id(blocks)] = copy.deepcopy(kept_blocks, memo)  # the copy sees only the kept blocks
    emulator = copy.deepcopy(full_model, memo)
    _slice_config(new_config, kept, split.num_layers)
    _fix_layer_metadata(emulator, getattr(new_config, KEPT_LAYERS_ATTR))
    return emulator


def _block_names(model: nn.Module, positions: Iterable[int]) -> list[str]:
    prefix = blocks_prefix(model)
    wanted = {f"{prefix}.{p}." for p in positions}
    names = []
    for name, _ in _unwrap(model).named_parameters():
        m = re.match(rf"{re.escape(prefix)}\.(\d+)\.", name)
        if m and m.group(0) in wanted:
            names.append(name)
    return names


def adapter_parameter_names(emulator: nn.Module, split: OffsiteSplit) -> list[str]:
    """Parameter names (emulator model order) of the adapter blocks: what clients train/send."""
    _check_depth(emulator, split.emulator_size, "emulator")
    return _block_names(emulator, split.emulator_adapter_positions())


def emulator_frozen_names(emulator: nn.Module, split: OffsiteSplit) -> list[str]:
    """Parameter names a client keeps frozen: emulator blocks, embeddings, final norm, head."""
    adapters = set(adapter_parameter_names(emulator, split))
    return [n for n, _ in _unwrap(emulator).named_parameters() if n not in adapters]


def mark_adapters_trainable(emulator: nn.Module, split: OffsiteSplit) -> list[str]:
    """Set ``requires_grad`` on adapter parameters only; returns the trainable names."""
    names = set(adapter_parameter_names(emulator, split))
    for name, param in _unwrap(emulator).named_parameters():
        param.requires_grad_(name in names)
    return sorted(names)


# ----------------------------------------------------------------------------- payload


def client_payload(emulator: nn.Module) -> dict[str, torch.Tensor]:
    """All tensors a client needs to rebuild the emulator: its persistent state dict, on CPU.

    Tied parameters (e.g. GPT-2/Qwen2 ``lm_head.weight`` = embeddings) travel once; an untied head
    (e.g. LLaMA's ``lm_head``) travels as its own tensor. Tensors are detached copies in the model's
    dtype (converting bfloat16 for the wire is the transport's job). Non-persistent buffers
    (rotary ``inv_freq``) are rebuilt from the config by :func:`emulator_from_payload`.
    """
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in _unwrap(emulator).state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor.detach().to("cpu", copy=True)
    return out


def emulator_from_payload(config, payload: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild the emulator from its config and :func:`client_payload` (client side).

    ``AutoModelForCausalLM.from_config`` + ``load_state_dict``; only tied duplicates may be missing.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    float_dtypes = {t.dtype for t in payload.values() if t.is_floating_point()}
    if len(float_dtypes) == 1:  # match the sender's dtype even if config.dtype is stale
        model.to(float_dtypes.pop())
    kept = getattr(model.config, KEPT_LAYERS_ATTR, None)
    if kept:
        _fix_layer_metadata(model, list(kept))
    result = model.load_state_dict(payload, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"payload has keys the emulator does not: {result.unexpected_keys[:5]}")
    if result.missing_keys:
        # a missing key is fine only if it is tied to (the same tensor as) a loaded one
        state = model.state_dict(keep_vars=True)
        loaded_ids = {id(state[k]) for k in payload}
        bad = [k for k in result.missing_keys if id(state[k]) not in loaded_ids]
        if bad:
            raise ValueError(f"payload lacks tensors needed by the emulator: {bad[:5]}")
    model.eval()
    return model


# ----------------------------------------------------------------------------- adapters


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA (or any mergeable peft tuner) into the base weights; plain models pass through.

    Use on a client's emulator whose adapter blocks were tuned with peft LoRA (e.g.
    ``LoraConfig(layers_to_transform=split.emulator_adapter_positions())``) before
    :func:`adapter_state`. Mutates the peft model (peft's ``merge_and_unload``).
    """
    if _is_peft(model):
        return model.merge_and_unload()
    return model


def adapter_state(emulator: nn.Module, split: OffsiteSplit) -> dict[str, torch.Tensor]:
    """Detached copies of the adapter blocks' parameters, keyed by emulator parameter name."""
    if _is_peft(emulator):
        raise TypeError("adapter_state needs a plain model: call merge_lora(emulator) first")
    params = dict(emulator.named_parameters())
    return {n: params[n].detach().clone() for n in adapter_parameter_names(emulator, split)}


@torch.no_grad()
def plug_in(
    full_model: nn.Module,
    adapter_state: dict[str, torch.Tensor],
    split: OffsiteSplit,
    strict: bool = True,
) -> list[str]:
    """Copy tuned adapter weights into the matching full-model blocks, in place.

    Emulator block ``j`` maps to full block ``split.full_index(j)`` (``j < a`` -> ``j``; top
    adapter ``a + n + t`` -> ``L - b + t``). Keys naming an emulator (middle) block or an unknown
    tensor raise; with ``strict`` every adapter-block parameter must be given. Returns the
    full-model-relative names written (``"<block>.<param>"``).
    """
    _check_depth(full_model, split.num_layers, "full model")
    prefix = blocks_prefix(full_model)
    blocks = decoder_blocks(full_model)
    adapter_pos = set(split.emulator_adapter_positions())
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    written: list[str] = []
    for key, value in adapter_state.items():
        m = pattern.match(key)
        if m is None:
            raise KeyError(f"adapter key {key!r} is not a parameter of a block under {prefix!r}")
        pos, rest = int(m.group(1)), m.group(2)
        if pos not in adapter_pos:
            raise KeyError(
                f"adapter key {key!r} names emulator block {pos}, not an adapter block "
                f"(adapter positions: {sorted(adapter_pos)})"
            )
        block = blocks[split.full_index(pos)]
        try:
            target = block.get_parameter(rest)
        except AttributeError as err:
            raise KeyError(f"full-model block has no parameter {rest!r} (from {key!r})") from err
        if target.shape != value.shape:
            raise ValueError(f"shape mismatch for {key!r}: {tuple(value.shape)} vs {target.shape}")
        target.copy_(value.to(device=target.device, dtype=target.dtype))
        written.append(f"{split.full_index(pos)}.{rest}")
    if strict:
        expected = {
            f"{i}.{n}" for i in split.adapter_indices() for n, _ in blocks[i].named_parameters()
        }
        missing = sorted(expected - set(written))
        if missing:
            raise KeyError(f"adapter_state lacks adapter parameters: {missing[:5]}")
    return written


# ----------------------------------------------------------------------------- distillation


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted block output is captured."""


def _block_output(model: nn.Module, index: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Output hidden state of block ``index`` of ``model`` for ``batch`` (the rest is skipped)."""
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = decoder_blocks(model)[index].register_forward_hook(hook)
    try:
        model(**batch, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"block {index} did not run in the forward pass")
    return captured[0]


def _cycle(batches: Iterable[dict]) -> Iterator[dict]:
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty or iter(batches) is batches:  # one-shot iterators are not restarted
            return


def distill_emulator(
    full_model: nn.Module,
    emulator: nn.Module,
    split: OffsiteSplit,
    batches: Iterable[dict[str, torch.Tensor]],
    steps: int,
    lr: float = 1e-4,
) -> list[float]:
    """Distil the emulator's middle blocks on public text (paper Sec. 3.3, distilled emulator).

    Both models run their real forward (masks, positions, rotary) on each batch. The full model's
    output of block ``L - b - 1`` (the hidden state entering the top adapters) is the target; the
    emulator's output of block ``a + n - 1`` is fed by its bottom adapters (copies of the full
    model's) and only its ``n`` middle blocks are trained, with AdamW on the MSE over non-padding
    tokens. Cycles over ``batches`` (re-iterable) for ``steps`` steps; returns per-step losses.
    Adapters, embeddings and head are left unchanged; ``requires_grad`` flags are restored.
    """
    if split.emulator_layers == 0:
        raise ValueError("distill_emulator needs emulator_layers > 0 (nothing to distil)")
    _check_depth(full_model, split.num_layers, "full model")
    _check_depth(emulator, split.emulator_size, "emulator")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    blocks = decoder_blocks(emulator)
    trainable = [p for i in split.emulator_middle_positions() for p in blocks[i].parameters()]
    flags = {id(p): p.requires_grad for p in emulator.parameters()}
    for p in emulator.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=lr)
    teacher_idx = split.num_layers - split.top - 1
    student_idx = split.bottom + split.emulator_layers - 1
    full_mode, emu_mode = full_model.training, emulator.training
    full_model.eval()
    emulator.train()
    device = next(emulator.parameters()).device
    teacher_device = next(full_model.parameters()).device
    losses: list[float] = []
    try:
        for step, batch in enumerate(_cycle(batches)):
            if step >= steps:
                break
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                target = _block_output(
                    full_model, teacher_idx, {k: v.to(teacher_device) for k, v in batch.items()}
                ).to(device)
            out = _block_output(emulator, student_idx, {k: v.to(device) for k, v in batch.items()})
            err = (out.float() - target.float()).pow(2).mean(dim=-1)
            mask = batch.get("attention_mask")
            if mask is not None:
                mask = mask.to(device=device, dtype=err.dtype)
                loss = (err * mask).sum() / mask.sum().clamp_min(1.0)
            else:
                loss = err.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        for p in emulator.parameters():
            p.requires_grad_(flags[id(p)])
        full_model.train(full_mode)
        emulator.train(emu_mode)
    return losses
