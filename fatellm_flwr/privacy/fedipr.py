"""FedIPR feature-based ownership watermarks (pure torch, no Flower import).

Li et al., "FedIPR: Ownership Verification for Federated Deep Neural Network Models"
(arXiv 2109.13236). Each client ``k`` keeps a secret: an ``n``-bit signature
``b_k in {-1, +1}^n`` and a Gaussian projection ``E_k`` (``n x d``). The carriers ``gamma`` are
``d`` weights of the model — as in FATE-LLM, the scales of the normalization layers of the
last transformer blocks. During local training the hinge regulariser
``alpha * sum_j relu(margin - b_j (E_k gamma)_j)`` pushes the signs of the projected carriers
towards the signature; ownership is verified by the detection rate, the fraction of bits with
``sign((E_k gamma)_j) == b_j`` (~0.5 for a secret the model never saw, 1.0 when embedded).

Design choices (this project's):

- Secrets come from OS randomness (a :func:`secrets.randbits` key seeds a torch generator),
  so no run-config seed reproduces another client's secret. Only the key and the carrier
  names are stored (:meth:`Secret.to_json`, a few hundred bytes) in the node's
  ``context.state``; they are never sent to the server.
- Each projection row is centred within every carrier tensor, so ``E gamma`` ignores a common
  scale of a norm layer (RMSNorm/LayerNorm scales start at 1, which would otherwise put every
  bit at a large random offset) and each row has unit norm, so ``margin`` is in weight units.
"""

from __future__ import annotations

import json
import re
import secrets as _secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

_NORM_HINTS = ("norm", "ln_")


@dataclass(frozen=True)
class Secret:
    """One owner's watermark key: the carriers, the number of bits and a 63-bit random key
    from which the signature and the projection are derived (:func:`generate_secret`)."""

    carriers: tuple[str, ...]  # carrier names (base-model module paths + ".weight")
    sizes: tuple[int, ...]  # numel of each carrier, in order
    key: int  # from OS randomness; whoever holds it can verify (keep it private)
    signature: torch.Tensor  # (n,) of -1/+1, float32
    projection: torch.Tensor  # (n, d) float32, rows centred per carrier, unit norm

    @property
    def bits(self) -> int:
        return int(self.signature.numel())

    def to_json(self) -> str:
        """Serialise (a few hundred bytes: the projection is re-derived from the key)."""
        return json.dumps({"carriers": list(self.carriers), "sizes": list(self.sizes),
                           "bits": self.bits, "key": str(self.key)})

    @classmethod
    def from_json(cls, text: str) -> Secret:
        d = json.loads(text)
        return generate_secret(d["carriers"], d["sizes"], int(d["bits"]), key=int(d["key"]))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Secret:
        return cls.from_json(Path(path).read_text())


# --------------------------------------------------------------------------- carriers
def block_norm_names(model: nn.Module, blocks: int) -> list[str]:
    """Module paths of the normalization layers inside the last ``blocks`` transformer blocks.

    Blocks are the children of the model's largest ``nn.ModuleList`` (``model.layers``,
    ``transformer.h``, ...); norm layers are modules with a 1-D ``weight`` whose class or name
    mentions a norm (LayerNorm, RMSNorm, ``ln_1``...). Found from the model, not a table.
    """
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of transformer blocks")
    list_name, layers = max(lists, key=lambda nm: len(nm[1]))
    if not 1 <= blocks <= len(layers):
        raise ValueError(f"fedipr-blocks={blocks}: the model has {len(layers)} blocks; "
                         f"choose 1..{len(layers)}")
    names = []
    for i in range(len(layers) - blocks, len(layers)):
        for sub, mod in layers[i].named_modules():
            weight = getattr(mod, "weight", None)
            is_norm = "norm" in type(mod).__name__.lower() or any(
                h in sub.rsplit(".", 1)[-1].lower() for h in _NORM_HINTS)
            if is_norm and isinstance(weight, torch.Tensor) and weight.dim() == 1 and sub:
                full = _canonical(f"{list_name}.{i}.{sub}." if list_name else f"{i}.{sub}.")
                if full[:-1] not in names:  # a PEFT-wrapped norm shows up once
                    names.append(full[:-1])
    if not names:
        raise ValueError(f"no normalization layers found in the last {blocks} blocks of "
                         f"{type(model).__name__}")
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
    """The carriers flattened into one float32 vector (differentiable)."""
    return torch.cat([p.reshape(-1).float() for p in carrier_parameters(model, carriers)])


# --------------------------------------------------------------------------- secrets
def generate_secret(carriers: Sequence[str], sizes: Sequence[int], bits: int,
                    key: int | None = None) -> Secret:
    """A ±1 signature and a Gaussian projection over the carriers, derived from ``key``.

    ``key=None`` (what clients use) draws a fresh 63-bit key from OS randomness
    (:mod:`secrets`); pass a key to re-derive a stored secret.
    """
    if bits < 1:
        raise ValueError(f"bits={bits} must be >= 1")
    key = _secrets.randbits(63) if key is None else int(key)
    d = int(sum(sizes))
    gen = torch.Generator().manual_seed(key)
    signature = torch.randint(0, 2, (bits,), generator=gen).float() * 2 - 1
    proj = torch.randn(bits, d, generator=gen)
    start = 0
    for size in sizes:  # centre each row within every carrier tensor
        seg = proj[:, start:start + size]
        if size > 1:
            seg -= seg.mean(dim=1, keepdim=True)
        start += size
    proj /= proj.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return Secret(tuple(carriers), tuple(int(s) for s in sizes), key, signature, proj)


def secret_for_model(model: nn.Module, blocks: int, bits: int,
                     key: int | None = None) -> Secret:
    """:func:`generate_secret` over the norm scales of the model's last ``blocks`` blocks."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    carriers = [f"{n}.weight" for n in block_norm_names(base, blocks)]
    sizes = [p.numel() for p in carrier_parameters(model, carriers)]
    return generate_secret(carriers, sizes, bits, key)


# --------------------------------------------------------------------------- loss, detection
def projected(gamma: torch.Tensor, secret: Secret) -> torch.Tensor:
    """``E gamma`` (the values whose signs carry the signature)."""
    if gamma.numel() != secret.projection.shape[1]:
        raise ValueError(f"carrier vector has {gamma.numel()} values, the secret expects "
                         f"{secret.projection.shape[1]}")
    return secret.projection.to(gamma.device) @ gamma.float()


def hinge_loss(gamma: torch.Tensor, secret: Secret, margin: float = 0.0) -> torch.Tensor:
    """FedIPR's sign regulariser ``sum_j relu(margin - b_j (E gamma)_j)`` (weight it by alpha)."""
    b = secret.signature.to(gamma.device)
    return torch.relu(margin - b * projected(gamma, secret)).sum()


def detection_rate(gamma: torch.Tensor, secret: Secret) -> float:
    """Fraction of signature bits whose sign is reproduced by the projected carriers."""
    with torch.no_grad():
        b = secret.signature.to(gamma.device)
        return float(((projected(gamma, secret) * b) > 0).float().mean())


def model_detection_rate(model: nn.Module, secret: Secret) -> float:
    """:func:`detection_rate` of the secret on a live model."""
    return detection_rate(carrier_vector(model, secret.carriers).detach(), secret)


def regulariser(secret: Secret, margin: float = 0.0):
    """``extra_loss(model)`` for the training loops: the hinge on the model's carriers.

    The loops minimise it in its own AdamW step after each training step
    (:func:`fatellm_flwr.train.train_local`), so no weight against the LM loss is needed.
    """

    def extra_loss(model: nn.Module) -> torch.Tensor:
        return hinge_loss(carrier_vector(model, secret.carriers), secret, margin)

    return extra_loss


# --------------------------------------------------------------------------- verification
def carriers_from_state_dict(state: Mapping[str, torch.Tensor | np.ndarray],
                             secret: Secret) -> torch.Tensor:
    """The carrier vector from a saved state dict (a full model's or a PEFT adapter's
    ``modules_to_save`` copies), matched by canonical name."""
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


def verify(model_or_path, secret: Secret, threshold: float = 0.9) -> Verification:
    """Check ``secret`` against a saved model (a folder with ``*.safetensors`` / ``*.bin``,
    e.g. a run's ``final/`` adapter, or a single file) or a live ``nn.Module``.

    Returns the detection rate and the probability that a model that never saw the secret
    matches as many bits by chance — the evidence an owner shows.
    """
    if isinstance(model_or_path, nn.Module):
        gamma = carrier_vector(model_or_path, secret.carriers).detach()
    else:
        gamma = carriers_from_state_dict(_load_state(Path(model_or_path)), secret)
    rate = detection_rate(gamma, secret)
    matches = round(rate * secret.bits)
    return Verification(rate, secret.bits, binomial_tail(matches, secret.bits),
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
