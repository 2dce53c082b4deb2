"""FedIPR feature-based ownership watermarks (pure torch, no Flower import).

Li et al., "FedIPR: Ownership Verification for Federated Deep Neural Network Models"
(arXiv 2109.13236). Each client ``k`` keeps a secret: an ``n``-bit signature
``b_k in {-1, +1}^n`` and a Gaussian projection ``E_k`` (``n x d``) over carrier weights
``gamma``. During local training the hinge regulariser
``alpha * sum_j relu(margin - b_j (E_k gamma)_j)`` pushes the signs of the projected carriers
towards the signature; ownership is verified by the detection rate, the fraction of bits with
``sign((E_k gamma)_j) == b_j`` (~0.5 for a secret the model never saw, 1.0 when embedded).

Two kinds of carriers (``fedipr-carriers``):

- ``norm`` (as FATE-LLM): the scales of the normalization layers of the last
  ``fedipr-blocks`` blocks, trained and aggregated next to the adapter (peft's
  ``modules_to_save``). Each projection row is centred within every carrier tensor, so
  ``E gamma`` ignores a common scale of a norm layer (RMSNorm/LayerNorm scales start at 1,
  which would otherwise put every bit at a large random offset), and has unit norm.
- ``lora``: the products ``dW_m = B_m A_m`` of the LoRA modules ``m`` of the last blocks,
  as stored (peft's ``lora_alpha / r`` scaling is *not* applied, so a saved adapter is
  verified from its factors alone; with one scaling for all modules, peft's default, the
  signs and so the detection are the same either way). No dense ``n x (d_out d_in)``
  projection is built: row ``j`` is a sum of rank-1 matrices,
  ``(E dW)_j = sum_m u_{j,m}^T B_m A_m v_{j,m}``, with ``u, v`` Gaussian directions scaled
  so that ``sum_m |u_{j,m}|^2 |v_{j,m}|^2 = 1``; it costs ``bits * (d_out + d_in)`` floats
  per module and ``bits * r * (d_out + d_in)`` flops. For norm and LoRA carriers alike each
  row has unit (Frobenius) norm, so ``margin`` is in weight units (of ``gamma``, of ``B A``).
  As ``u`` is symmetric, each bit of a secret a model never saw matches with probability
  1/2 whatever the model's ``dW``; bits are independent (independent rows).

A projected value of exactly 0 (an untrained LoRA, ``B = 0``) counts as half a match.

Design choices (this project's):

- Secrets come from OS randomness (a :func:`secrets.randbits` key seeds a torch generator),
  so no run-config seed reproduces another client's secret. Only the kind, the key and the
  carrier names and sizes are stored (:meth:`Secret.to_json`, a few hundred bytes; about
  1 kB for LoRA carriers over 2 blocks of 7 modules) in the node's ``context.state``; they
  are never sent to the server.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets as _secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

_NORM_HINTS = ("norm", "ln_")
CARRIER_KINDS = ("norm", "lora")
Carriers = torch.Tensor | Sequence[tuple[torch.Tensor, torch.Tensor]]
"""What a secret is checked against: the norm carriers as one vector, or the ``(A, B)``
weights (``A``: ``r x d_in``, ``B``: ``d_out x r``) of each LoRA carrier module, in order."""


@dataclass(frozen=True)
class Secret:
    """One owner's watermark key: the carrier kind and carriers, the number of bits and a
    63-bit random key from which the signature and the projection are derived
    (:func:`generate_secret`)."""

    carriers: tuple[str, ...]  # norm: parameter names (".weight"); lora: LoRA module paths
    sizes: tuple  # norm: numel of each carrier; lora: (d_out, d_in) of each module
    key: int  # from OS randomness; whoever holds it can verify (keep it private)
    signature: torch.Tensor  # (n,) of -1/+1, float32
    projection: torch.Tensor  # (n, D) float32; norm: D = sum numel, lora: [u_m | v_m] per m
    kind: str = "norm"  # "norm" or "lora" (CARRIER_KINDS)

    @property
    def bits(self) -> int:
        return int(self.signature.numel())

    def to_json(self) -> str:
        """Serialise (a few hundred bytes: the projection is re-derived from the key)."""
        sizes = [list(s) if isinstance(s, tuple) else s for s in self.sizes]
        return json.dumps({"kind": self.kind, "carriers": list(self.carriers), "sizes": sizes,
                           "bits": self.bits, "key": str(self.key)})

    @classmethod
    def from_json(cls, text: str) -> Secret:
        d = json.loads(text)
        return generate_secret(d["carriers"], d["sizes"], int(d["bits"]), key=int(d["key"]),
                               kind=d.get("kind", "norm"))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Secret:
        return cls.from_json(Path(path).read_text())

    def fresh(self) -> Secret:
        """A new OS-random secret over the same carriers (a never-seen control)."""
        return generate_secret(self.carriers, self.sizes, self.bits, kind=self.kind)

    def to(self, device: torch.device | str) -> Secret:
        """A copy with the signature and projection on ``device``."""
        return dataclasses.replace(self, signature=self.signature.to(device),
                                   projection=self.projection.to(device))


# --------------------------------------------------------------------------- carriers
def _last_blocks(model: nn.Module, blocks: int) -> list[tuple[str, nn.Module]]:
    """``(path prefix, block)`` of the last ``blocks`` transformer blocks: the children of the
    model's largest ``nn.ModuleList`` (``model.layers``, ``transformer.h``, ...)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of transformer blocks")
    list_name, layers = max(lists, key=lambda nm: len(nm[1]))
    if not 1 <= blocks <= len(layers):
        raise ValueError(f"fedipr-blocks={blocks}: the model has {len(layers)} blocks; "
                         f"choose 1..{len(layers)}")
    return [(f"{list_name}.{i}." if list_name else f"{i}.", layers[i])
            for i in range(len(layers) - blocks, len(layers))]


def block_norm_names(model: nn.Module, blocks: int) -> list[str]:
    """Module paths of the normalization layers inside the last ``blocks`` transformer blocks.

    Norm layers are modules with a 1-D ``weight`` whose class or name mentions a norm
    (LayerNorm, RMSNorm, ``ln_1``...). Found from the model, not a table. Raises, pointing
    to ``fedipr-carriers=lora``, when the blocks have no norm scale (e.g. OLMo's
    non-parametric LayerNorm).
    """
    names: list[str] = []
    weightless: list[str] = []
    for prefix, block in _last_blocks(model, blocks):
        for sub, mod in block.named_modules():
            weight = getattr(mod, "weight", None)
            is_norm = "norm" in type(mod).__name__.lower() or any(
                h in sub.rsplit(".", 1)[-1].lower() for h in _NORM_HINTS)
            if not (is_norm and sub):
                continue
            full = _canonical(f"{prefix}{sub}.")[:-1]
            if isinstance(weight, torch.Tensor) and weight.dim() == 1:
                if full not in names:  # a PEFT-wrapped norm shows up once
                    names.append(full)
            elif weight is None and not any(True for _ in mod.parameters()):
                weightless.append(full)
    if not names:
        listed = ", ".join(weightless[:2]) + (", ..." if len(weightless) > 2 else "")
        found = (f"its normalization layers ({listed}) have no trainable scale"
                 if weightless else "no normalization layers found")
        raise ValueError(f"fedipr-carriers=norm: in the last {blocks} blocks of "
                         f"{type(model).__name__} {found}; set fedipr-carriers=lora to carry "
                         "the signatures in the LoRA products instead")
    return names


def _canonical(name: str) -> str:
    """A parameter name without PEFT wrapping (``base_model.model.``, ``modules_to_save``)."""
    name = name.replace("base_model.model.", "")
    name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
    return name.replace(".original_module.", ".")


def carrier_parameters(model: nn.Module, carriers: Sequence[str]) -> list[torch.Tensor]:
    """The live parameter of each carrier name, preferring PEFT's trainable copy
    (``modules_to_save``) over the frozen original; raises when one is missing."""
    found: dict[str, tuple[int, torch.Tensor]] = {}
    for name, p in model.named_parameters():
        canon = _canonical(name)
        rank = 2 if ".modules_to_save." in name else (0 if ".original_module." in name else 1)
        if canon in carriers and rank >= found.get(canon, (-1, None))[0]:
            found[canon] = (rank, p)
    missing = [c for c in carriers if c not in found]
    if missing:
        raise KeyError(f"carrier weights {missing[:3]} not found in the model "
                       "(different architecture or fedipr-blocks?)")
    return [found[c][1] for c in carriers]


def carrier_vector(model: nn.Module, carriers: Sequence[str]) -> torch.Tensor:
    """The norm carriers flattened into one float32 vector (differentiable)."""
    return torch.cat([p.reshape(-1).float() for p in carrier_parameters(model, carriers)])


def _lora_weights(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A, B)`` weights of a peft LoRA layer's active adapter; None for other modules."""
    lora_a, lora_b = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None)
    if not (isinstance(lora_a, nn.ModuleDict) and isinstance(lora_b, nn.ModuleDict)):
        return None
    names = [a for a in (getattr(mod, "active_adapters", None) or []) if a in lora_a]
    names = names or list(lora_a.keys())
    if not names or names[0] not in lora_b:
        return None
    return lora_a[names[0]].weight, lora_b[names[0]].weight


def block_lora_names(model: nn.Module, blocks: int) -> list[str]:
    """Module paths (base-model names) of the LoRA layers inside the last ``blocks`` blocks."""
    names: list[str] = []
    for prefix, block in _last_blocks(model, blocks):
        for sub, mod in block.named_modules():
            if sub and _lora_weights(mod) is not None:
                names.append(_canonical(f"{prefix}{sub}"))
    if not names:
        raise ValueError(f"fedipr-carriers=lora: no LoRA modules in the last {blocks} blocks "
                         f"of {type(model).__name__} (peft-method=lora, target-modules?)")
    return names


def lora_factors(model: nn.Module, modules: Sequence[str]) -> list[tuple[torch.Tensor,
                                                                        torch.Tensor]]:
    """The live ``(A, B)`` weights of each named LoRA module; raises when one is missing."""
    found = {}
    for name, mod in model.named_modules():
        ab = _lora_weights(mod)
        if ab is not None:
            found[_canonical(name)] = ab
    missing = [m for m in modules if m not in found]
    if missing:
        raise KeyError(f"LoRA carrier modules {missing[:3]} not found in the model "
                       "(different architecture, target-modules or fedipr-blocks?)")
    return [found[m] for m in modules]


def carrier_values(model: nn.Module, secret: Secret) -> Carriers:
    """The model's live carriers for ``secret`` (differentiable): the norm vector, or the
    LoRA ``(A, B)`` pairs."""
    if secret.kind == "lora":
        return lora_factors(model, secret.carriers)
    return carrier_vector(model, secret.carriers)


# --------------------------------------------------------------------------- secrets
def generate_secret(carriers: Sequence[str], sizes: Sequence, bits: int,
                    key: int | None = None, kind: str = "norm") -> Secret:
    """A ±1 signature and a Gaussian projection over the carriers, derived from ``key``.

    ``sizes``: the numel of each norm carrier, or ``(d_out, d_in)`` of each LoRA module.
    ``key=None`` (what clients use) draws a fresh 63-bit key from OS randomness
    (:mod:`secrets`); pass a key to re-derive a stored secret.
    """
    if bits < 1:
        raise ValueError(f"bits={bits} must be >= 1")
    if kind not in CARRIER_KINDS:
        raise ValueError(f"carrier kind {kind!r}; allowed: {', '.join(CARRIER_KINDS)}")
    if len(sizes) != len(carriers) or not carriers:
        raise ValueError(f"{len(carriers)} carriers but {len(sizes)} sizes")
    if kind == "lora":
        if any(len(s) != 2 for s in sizes):
            raise ValueError("lora carriers need a (d_out, d_in) pair per module")
        sizes = tuple((int(o), int(i)) for o, i in sizes)
        widths = [o + i for o, i in sizes]
    else:
        sizes = tuple(int(s) for s in sizes)
        widths = list(sizes)
    key = _secrets.randbits(63) if key is None else int(key)
    gen = torch.Generator().manual_seed(key)
    signature = torch.randint(0, 2, (bits,), generator=gen).float() * 2 - 1
    proj = torch.randn(bits, sum(widths), generator=gen)
    if kind == "norm":
        start = 0
        for size in sizes:  # centre each row within every carrier tensor
            seg = proj[:, start:start + size]
            if size > 1:
                seg -= seg.mean(dim=1, keepdim=True)
            start += size
        proj /= proj.norm(dim=1, keepdim=True).clamp_min(1e-12)
    else:  # unit u and v per module, / sqrt(modules): each row's sum of u v^T has unit norm
        start = 0
        for d_out, d_in in sizes:
            u, v = proj[:, start:start + d_out], proj[:, start + d_out:start + d_out + d_in]
            u /= u.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(len(sizes))
            v /= v.norm(dim=1, keepdim=True).clamp_min(1e-12)
            start += d_out + d_in
    return Secret(tuple(carriers), sizes, key, signature, proj, kind)


def secret_for_model(model: nn.Module, blocks: int, bits: int, key: int | None = None,
                     kind: str = "norm") -> Secret:
    """:func:`generate_secret` over the model's last ``blocks`` blocks: their norm scales
    (``kind="norm"``) or their LoRA modules (``kind="lora"``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if kind == "lora":
        carriers = block_lora_names(base, blocks)
        sizes: list = [(b.shape[0], a.shape[1]) for a, b in lora_factors(model, carriers)]
    else:
        carriers = [f"{n}.weight" for n in block_norm_names(base, blocks)]
        sizes = [p.numel() for p in carrier_parameters(model, carriers)]
    return generate_secret(carriers, sizes, bits, key, kind)


# --------------------------------------------------------------------------- loss, detection
def projected(gamma: Carriers, secret: Secret) -> torch.Tensor:
    """``E gamma`` (the values whose signs carry the signature); for LoRA carriers
    ``sum_m u_m^T B_m A_m v_m`` per bit, without forming ``B_m A_m``."""
    if secret.kind == "lora":
        return _lora_projected(gamma, secret)
    if not isinstance(gamma, torch.Tensor):
        raise TypeError("norm carriers are one vector (carrier_vector)")
    if gamma.numel() != secret.projection.shape[1]:
        raise ValueError(f"carrier vector has {gamma.numel()} values, the secret expects "
                         f"{secret.projection.shape[1]}")
    return secret.projection.to(gamma.device) @ gamma.float()


def _lora_projected(factors: Carriers, secret: Secret) -> torch.Tensor:
    if isinstance(factors, torch.Tensor) or len(factors) != len(secret.sizes):
        raise ValueError(f"lora carriers are {len(secret.sizes)} (A, B) pairs "
                         "(lora_factors)")
    total, start = None, 0
    for (a, b), (d_out, d_in), name in zip(factors, secret.sizes, secret.carriers):
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape[0] != d_out:
            raise ValueError(f"LoRA factors of {name} have shapes A {tuple(a.shape)}, "
                             f"B {tuple(b.shape)}; the secret expects B A of {d_out}x{d_in}")
        proj = secret.projection.to(b.device)
        u, v = proj[:, start:start + d_out], proj[:, start + d_out:start + d_out + d_in]
        term = ((u @ b.float()) * (v @ a.float().T)).sum(dim=1)  # u^T B . A v, per bit
        total = term if total is None else total + term
        start += d_out + d_in
    return total


def hinge_loss(gamma: Carriers, secret: Secret, margin: float = 0.0) -> torch.Tensor:
    """FedIPR's sign regulariser ``sum_j relu(margin - b_j (E gamma)_j)`` (weight it by alpha)."""
    values = projected(gamma, secret)
    return torch.relu(margin - secret.signature.to(values.device) * values).sum()


def detection_rate(gamma: Carriers, secret: Secret) -> float:
    """Fraction of signature bits whose sign is reproduced by the projected carriers
    (a value of exactly 0, e.g. an untrained LoRA, counts as half)."""
    return _match_count(gamma, secret) / secret.bits


def _match_count(gamma: Carriers, secret: Secret) -> float:
    with torch.no_grad():
        values = projected(gamma, secret)
        signed = values * secret.signature.to(values.device)
        return float(((signed > 0).float() + 0.5 * (signed == 0).float()).sum())


def model_detection_rate(model: nn.Module, secret: Secret) -> float:
    """:func:`detection_rate` of the secret on a live model."""
    return detection_rate(carrier_values(model, secret), secret)


def regulariser(secret: Secret, margin: float = 0.0) -> Callable[[nn.Module], torch.Tensor]:
    """``extra_loss(model)`` for the training loops: the hinge on the model's carriers.

    The loops minimise it in its own AdamW step after each training step
    (:func:`fatellm_flwr.train.train_local`), so no weight against the LM loss is needed.
    The projection is moved to the carriers' device once.
    """
    moved: dict[torch.device, Secret] = {}

    def extra_loss(model: nn.Module) -> torch.Tensor:
        gamma = carrier_values(model, secret)
        device = gamma.device if isinstance(gamma, torch.Tensor) else gamma[0][1].device
        if device not in moved:
            moved[device] = secret.to(device)
        return hinge_loss(gamma, moved[device], margin)

    return extra_loss


# --------------------------------------------------------------------------- verification
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def carriers_from_state_dict(state: Mapping[str, torch.Tensor | np.ndarray],
                             secret: Secret) -> Carriers:
    """The carriers from a saved state dict, matched by canonical name: the norm vector (a
    full model's weights or a PEFT adapter's ``modules_to_save`` copies), or the LoRA
    ``(A, B)`` pairs (a PEFT adapter's ``lora_A`` / ``lora_B`` weights)."""
    if secret.kind == "lora":
        factors: dict[tuple[str, str], torch.Tensor] = {}
        for key, value in state.items():
            m = _LORA_KEY.match(_canonical(key))
            if m and m["module"] in secret.carriers:
                factors[(m["module"], m["ab"])] = torch.as_tensor(np.asarray(value),
                                                                  dtype=torch.float32)
        missing = [c for c in secret.carriers
                   if (c, "A") not in factors or (c, "B") not in factors]
        if missing:
            raise KeyError(f"the saved model lacks the LoRA factors of {missing[:3]} "
                           "(lora carriers are verified on the unmerged adapter)")
        return [(factors[(c, "A")], factors[(c, "B")]) for c in secret.carriers]
    by_name: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        canon = _canonical(key)
        if canon in secret.carriers and (canon not in by_name or "modules_to_save" in key):
            by_name[canon] = torch.as_tensor(np.asarray(value), dtype=torch.float32)
    missing = [c for c in secret.carriers if c not in by_name]
    if missing:
        raise KeyError(f"the saved model lacks carrier weights {missing[:3]}")
    return torch.cat([by_name[c].reshape(-1) for c in secret.carriers])


@dataclass(frozen=True)
class Verification:
    detection: float  # fraction of matching bits
    bits: int
    p_value: float  # P(>= this many matches | random model), binomial(bits, 1/2) tail
    owner: bool  # detection >= threshold


def binomial_tail(matches: int, bits: int) -> float:
    """``P(X >= matches)`` for ``X ~ Binomial(bits, 1/2)``: chance level of a detection."""
    from math import comb

    return float(sum(comb(bits, k) for k in range(matches, bits + 1)) / 2 ** bits)


def verify(model_or_path: nn.Module | str | Path, secret: Secret,
           threshold: float = 0.9) -> Verification:
    """Check ``secret`` against a saved model (a folder with ``*.safetensors`` / ``*.bin``,
    e.g. a run's ``final/`` adapter, or a single file) or a live ``nn.Module``.

    Returns the detection rate and the probability that a model that never saw the secret
    matches as many bits by chance — the evidence an owner shows.
    """
    if isinstance(model_or_path, nn.Module):
        gamma = carrier_values(model_or_path, secret)
    else:
        gamma = carriers_from_state_dict(_load_state(Path(model_or_path)), secret)
    count = _match_count(gamma, secret)
    rate = count / secret.bits
    # a tie (half a match) does not count towards the p-value
    return Verification(rate, secret.bits, binomial_tail(math.floor(count), secret.bits),
                        rate >= threshold)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) or sorted(
        path.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weights in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(f)))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fatellm_flwr.privacy.fedipr SAVED_MODEL SECRET.json``: prove ownership."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("model", help="saved model/adapter folder or weights file")
    ap.add_argument("secret", help="the owner's secret (JSON written by Secret.save)")
    ap.add_argument("--threshold", type=float, default=0.9)
    args = ap.parse_args(argv)
    v = verify(args.model, Secret.load(args.secret), args.threshold)
    print(f"detection {v.detection:.3f} over {v.bits} bits; chance p-value {v.p_value:.3g}; "
          f"{'OWNER' if v.owner else 'not verified'}")
    return 0 if v.owner else 1


if __name__ == "__main__":
    raise SystemExit(main())
