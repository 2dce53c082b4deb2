"""Sample-level DP-SGD for a client's trainable parameters (PEFT adapters) with Opacus.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy"): every step draws a
Poisson sample of the client's records, clips each record's gradient to L2 norm
``max_grad_norm``, sums, adds N(0, (noise_multiplier * max_grad_norm)^2) per coordinate and
divides by the expected batch size. Per-sample gradients come from Opacus' own grad samplers
(hooks; functorch for layer types without one) — nothing here computes them by hand.

Accounting survives process restarts: a Flower client is rebuilt every round, so the only
thing that persists is a short history of ``(noise_multiplier, sample_rate, steps)`` entries.
:func:`epsilon_from_history` turns such a history into epsilon with Opacus' RDP (Mironov 2017)
or PRV (Gopi et al. 2021) accountant, and :func:`steps_until_budget` says how many more steps
fit under ``max_epsilon``.

Randomness: the noise and the Poisson sampler must be unpredictable to everyone else,
the server included, or the released update can be de-noised and the epsilon protects
nothing. By default both come from :func:`os_random_generator` (a torch generator seeded
with 63 bits from the OS CSPRNG, a fresh one per session), never from a run-config seed.
That stream is unpredictable without the seed but is not itself a CSPRNG (torch's Mersenne
Twister on CPU, Philox on CUDA). Opacus' own ``secure_mode`` would draw every number from
``torchcsprng`` (and add its floating-point-attack mitigation), but torchcsprng has no build
for current torch (last release 0.2.1, for torch 1.8), so it is not used. Explicit
generators (reproducible noise) are for tests and debugging only.

Language-model loss: DP-SGD needs one loss per record. Hugging Face's ``labels=`` loss is a
token mean over the whole batch, which couples records (a record's weight depends on the
others' lengths); use :func:`per_sequence_lm_loss` (mean over each sequence's tokens) instead.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import IAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis.rdp import compute_rdp
from opacus.accountants.analysis.rdp import get_privacy_spent as rdp_privacy_spent
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import CollateFnWithEmpty
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, default_collate

logger = logging.getLogger(__name__)

ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("hooks", "functorch")
IGNORE_INDEX = -100

HistoryEntry = tuple[float, float, int]
"""One accounting record: ``(noise_multiplier, sample_rate, steps)``, as in Opacus' accountants."""

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]


class PrivacyBudgetExhausted(RuntimeError):
    """Raised when one more DP step would push cumulative epsilon past ``max_epsilon``."""


# --------------------------------------------------------------------------- validation


def _check_positive(key: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key}={value!r} is invalid: must be a finite number > 0")


def _check_count(key: str, value: Any) -> None:
    if value is not None and (int(value) != value or value < 1):
        raise ValueError(f"{key}={value!r} is invalid: must be an integer >= 1")


def _check_delta(delta: float) -> None:
    if not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta={delta!r} is invalid: must satisfy 0 < delta < 1")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"accountant={accountant!r} is invalid: allowed values are {', '.join(ACCOUNTANTS)}"
        )


def _check_history(history: Iterable[Sequence[float]]) -> list[HistoryEntry]:
    out: list[HistoryEntry] = []
    for i, entry in enumerate(history):
        if len(entry) != 3:
            raise ValueError(
                f"history[{i}]={entry!r} is invalid: must be (noise_multiplier, sample_rate, steps)"
            )
        noise, q, steps = float(entry[0]), float(entry[1]), int(entry[2])
        if noise < 0 or not 0 <= q <= 1 or steps < 0 or steps != entry[2]:
            raise ValueError(
                f"history[{i}]={tuple(entry)!r} is invalid: need noise_multiplier >= 0, "
                "0 <= sample_rate <= 1 and an integer steps >= 0"
            )
        out.append((noise, q, steps))
    return out


# --------------------------------------------------------------------------- accounting


def merge_history(history: Iterable[Sequence[float]]) -> list[HistoryEntry]:
    """Merge entries with the same ``(noise, sample_rate)`` and drop empty ones.

    Composition of identical subsampled Gaussian steps only depends on their total count, so
    the merged history gives the same epsilon and stays a few entries long however many rounds
    run.
    """
    merged: dict[tuple[float, float], int] = {}
    for noise, q, steps in _check_history(history):
        if steps > 0 and q > 0:
            merged[(noise, q)] = merged.get((noise, q), 0) + steps
    return [(noise, q, steps) for (noise, q), steps in merged.items()]


def epsilon_from_history(
    history: Iterable[Sequence[float]], delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon at ``delta`` of a composition of Poisson-subsampled Gaussian mechanisms.

    Pure function: builds a fresh Opacus accountant, sets its ``history`` and asks for the
    epsilon, so a round-by-round history stored anywhere gives the same answer as one
    long-lived accountant. Steps with ``noise_multiplier == 0`` make epsilon infinite.
    """
    _check_delta(delta)
    _check_accountant(accountant)
    entries = merge_history(history)
    if not entries:
        return 0.0
    if any(noise == 0 for noise, _, _ in entries):
        return math.inf
    acc = create_accountant(mechanism=accountant)
    acc.history = entries
    return float(acc.get_epsilon(delta=delta))


def rdp_epsilon_floor(delta: float) -> float:
    """Epsilon of the RDP-to-DP conversion alone (zero RDP) over Opacus' default orders.

    No noise multiplier gets the RDP accountant below this (about 0.103 at delta=1e-5).
    """
    _check_delta(delta)
    orders = RDPAccountant.DEFAULT_ALPHAS
    eps, _ = rdp_privacy_spent(orders=orders, rdp=np.zeros(len(orders)), delta=delta)
    return float(eps)


def noise_multiplier_for_budget(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """Smallest noise multiplier (Opacus' binary search) with epsilon <= target after ``steps``.

    Raises ValueError naming the target when Opacus cannot reach it (sigma would exceed 1e6).
    """
    _check_positive("target_epsilon", target_epsilon)
    _check_delta(delta)
    _check_accountant(accountant)
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate!r} is invalid: must satisfy 0 < q <= 1")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"planned_steps={steps!r} is invalid: must be an integer >= 1")
    if accountant == "rdp" and target_epsilon <= (floor := rdp_epsilon_floor(delta)):
        # checked first: Opacus' search would spend about a minute doubling sigma up to 1e6
        raise ValueError(
            f"target_epsilon={target_epsilon!r} is unreachable: converting RDP to "
            f"(epsilon, delta={delta})-DP costs at least {floor:.4f} whatever the noise; "
            "raise target_epsilon or delta, or use accountant='prv'"
        )
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=int(steps),
                accountant=accountant,
            )
        )
    except ValueError as err:
        raise ValueError(
            f"target_epsilon={target_epsilon!r} is unreachable: no noise multiplier up to 1e6 "
            f"gives epsilon <= {target_epsilon} at delta={delta} after {int(steps)} steps with "
            f"sample rate {sample_rate:.4g} ({accountant} accountant: {err}); "
            "raise target_epsilon or delta, or take fewer steps"
        ) from err


def steps_until_budget(
    history: Iterable[Sequence[float]],
    next_entry: tuple[float, float],
    delta: float,
    max_epsilon: float,
    accountant: str = "rdp",
    max_steps: int = 10**7,
) -> int:
    """How many more steps at ``next_entry = (noise, sample_rate)`` keep epsilon <= max_epsilon.

    0 when the history alone already exceeds the budget (or one step would); ``max_steps``
    when the budget is not reached within that many steps. Epsilon grows with steps, so an
    exponential then binary search needs O(log steps) accountant calls.
    """
    _check_positive("max_epsilon", max_epsilon)
    _check_delta(delta)
    _check_accountant(accountant)
    noise, q = float(next_entry[0]), float(next_entry[1])
    past = merge_history(history)

    if accountant == "rdp" and noise > 0 and all(n > 0 for n, _, _ in past):
        # RDP is linear in steps: compute the per-order vectors once (what RDPAccountant does)
        orders = RDPAccountant.DEFAULT_ALPHAS
        rdp_past = sum(
            (compute_rdp(q=qq, noise_multiplier=n, steps=k, orders=orders) for n, qq, k in past),
            np.zeros(len(orders)),
        )
        rdp_step = compute_rdp(q=q, noise_multiplier=noise, steps=1, orders=orders)

        def fits(k: int) -> bool:
            rdp = rdp_past + k * rdp_step
            return rdp_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0] <= max_epsilon

    else:

        def fits(k: int) -> bool:
            entries = past + [(noise, q, k)]
            return epsilon_from_history(entries, delta, accountant) <= max_epsilon

    if not fits(0):
        return 0
    lo, hi = 0, 1  # fits(lo) holds; search for the first hi that does not fit
    while fits(hi):
        lo = hi
        if hi >= max_steps:
            return max_steps
        hi = min(2 * hi, max_steps)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


# --------------------------------------------------------------------------- randomness


def os_random_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with 63 bits from the OS CSPRNG (``secrets``).

    Nobody can predict its stream from the run config or anything else the client shares,
    so DP noise and Poisson batches drawn from it cannot be regenerated by the server.
    """
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


# --------------------------------------------------------------------------- losses, batches


def per_sequence_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM loss per sequence: shape ``[batch]``.

    Shifted like Hugging Face (position t predicts label t+1); labels equal to -100 are
    ignored; each sequence's loss is the mean over its own unmasked tokens (0 for a
    sequence without any), so one record's loss never depends on the other records.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must be "
            "[batch, seq, vocab] and [batch, seq]"
        )
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(logits.device)
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    mask = (shift_labels != IGNORE_INDEX).to(token_loss.dtype)
    return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def causal_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Default per-record loss: forward without ``labels`` then :func:`per_sequence_lm_loss`.

    ``batch`` has ``input_ids``, optionally ``attention_mask`` and ``labels``; without labels
    the inputs are the labels, with padding (attention_mask == 0) masked to -100.
    """
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids.clone()
        if attention_mask is not None:
            labels[attention_mask == 0] = IGNORE_INDEX
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return per_sequence_lm_loss(logits, labels)


def batch_size_of(batch: Any) -> int:
    """Number of records in a collated batch (first tensor's leading dim; 0 for ``[]``)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 0
    if isinstance(batch, Mapping):
        values: Iterable[Any] = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        raise TypeError(f"cannot find the batch size of a {type(batch).__name__}")
    for value in values:
        return batch_size_of(value)
    return 0


def is_empty_batch(batch: Any) -> bool:
    """True for the zero-record batches Poisson sampling produces (Opacus collates them as
    zero-length tensors of the usual structure, or ``[]`` if the very first batch is empty)."""
    return batch_size_of(batch) == 0


# --------------------------------------------------------------------------- model checks


def freeze_unsupported_modules(model: nn.Module) -> list[str]:
    """Freeze trainable modules whose per-sample gradients Opacus cannot compute correctly.

    Checks, per trainable module (Opacus' ``trainable_modules``; the model must be in train
    mode): Opacus' registered module validators (BatchNorm, LSTM, ...), trainable modules
    holding buffers (GradSampleModule rejects them: buffers are not private), and PEFT prompt
    tuning's ``PromptEmbedding``: Opacus' embedding sampler supports it, but PEFT encodes the
    virtual tokens for one row and repeats them over the batch, so the "per-sample" gradient
    would be the batch sum (measured: grad_sample has batch dim 1). Returns the frozen names;
    a warning names them.
    """
    frozen: list[str] = []
    for name, module in list(trainable_modules(model)):
        reasons: list[str] = []
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is not None:
            reasons += [str(e) for e in validator(module)]
        if any(True for _ in module.buffers()):
            reasons.append("trainable module with buffers")
        if reasons:
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
            frozen.append(name)
            logger.warning("DP-SGD: froze %s (%s)", name or "<root>", "; ".join(reasons))
    for name, module in model.named_modules():
        trainable = [p for p in module.parameters() if p.requires_grad]
        if type(module).__name__ == "PromptEmbedding" and trainable:
            for p in trainable:
                p.requires_grad_(False)
            frozen.append(name)
            logger.warning(
                "DP-SGD: froze %s (PEFT prompt tuning encodes one prompt row and repeats it "
                "over the batch, so it has no per-sample gradients)",
                name,
            )
    return frozen


# --------------------------------------------------------------------------- session


@dataclass
class DPSession:
    """A model, optimizer and loader made private by Opacus, plus what accounting needs.

    ``model`` is Opacus' ``GradSampleModule`` wrapping the caller's model (same parameters);
    :meth:`close` removes the hooks and returns the original module. ``prior_history`` holds
    earlier rounds' entries so :meth:`epsilon` and the ``max_epsilon`` guard are cumulative.
    """

    model: GradSampleModule
    optimizer: DPOptimizer
    data_loader: DataLoader
    privacy_engine: PrivacyEngine
    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    delta: float
    accountant_name: str = "rdp"
    planned_steps: int | None = None
    max_epsilon: float | None = None
    prior_history: list[HistoryEntry] = field(default_factory=list)
    frozen_modules: list[str] = field(default_factory=list)
    step_limit: int | None = None
    physical_batch_size: int | None = None

    @property
    def accountant(self) -> IAccountant:
        """Opacus' live accountant for this session (steps of this round only)."""
        return self.privacy_engine.accountant

    @property
    def steps(self) -> int:
        """DP steps taken in this session (noise-only steps on empty batches included)."""
        return sum(int(n) for _, _, n in self.accountant.history)

    def history_entry(self) -> HistoryEntry:
        """This round's accounting record ``(noise_multiplier, sample_rate, steps)``."""
        return (float(self.noise_multiplier), float(self.sample_rate), self.steps)

    def history(self) -> list[HistoryEntry]:
        """Prior rounds plus this one, merged: what a client should persist."""
        return merge_history([*self.prior_history, self.history_entry()])

    def epsilon(self, delta: float | None = None) -> float:
        """Cumulative epsilon (prior rounds + this session) at ``delta`` (default: session's)."""
        return epsilon_from_history(
            self.history(), self.delta if delta is None else delta, self.accountant_name
        )

    def steps_left(self) -> int | None:
        """Steps this session may still take under ``max_epsilon`` (None: no budget set)."""
        return None if self.step_limit is None else max(self.step_limit - self.steps, 0)

    def _check_budget(self) -> None:
        if self.step_limit is not None and self.steps >= self.step_limit:
            raise PrivacyBudgetExhausted(
                f"privacy budget max_epsilon={self.max_epsilon} reached: another DP step "
                f"(noise_multiplier={self.noise_multiplier:.4g}, sample_rate="
                f"{self.sample_rate:.4g}) would exceed it; epsilon so far "
                f"{self.epsilon():.4g} at delta={self.delta} after {self.steps} steps this "
                f"session and {sum(n for *_, n in self.prior_history)} earlier; stop training"
            )

    def noise_only_step(self) -> None:
        """A DP step on an empty Poisson batch: zero clipped sum plus noise, and accounted.

        Skipping empty batches would release "this batch was empty", which the subsampled
        Gaussian analysis does not cover; Opacus' own loop takes this step too.
        """
        self._check_budget()
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(
        self, batch: Mapping[str, torch.Tensor], loss_fn: LossFn = causal_lm_loss
    ) -> float | None:
        """One DP-SGD step; returns the batch's mean loss, or None for an empty batch.

        ``loss_fn(model, batch)`` must return one loss per record (shape ``[batch]``); the
        mean over the batch is back-propagated (Opacus ``loss_reduction="mean"``).
        Raises :class:`PrivacyBudgetExhausted` before a step that would exceed ``max_epsilon``.

        With ``physical_batch_size``, a larger (Poisson) batch is processed in chunks of at
        most that many records (virtual batching, as Opacus' ``BatchMemoryManager``): each
        chunk's per-sample gradients are clipped and summed, and noise, scaling and the
        accountant's step happen once for the whole batch, so the update and the epsilon are
        those of the logical batch while memory is bounded by the chunk.
        """
        if is_empty_batch(batch):
            self.noise_only_step()
            return None
        self._check_budget()
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        n = batch_size_of(batch)
        chunk = self.physical_batch_size or n
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for start in range(0, n, chunk):
            part = {k: v[start:start + chunk] if isinstance(v, torch.Tensor) else v
                    for k, v in batch.items()}
            last = start + chunk >= n
            total += self._backward(part, loss_fn) * batch_size_of(part)
            if not last:  # clip and sum this chunk; noise + update after the last one
                self.optimizer.signal_skip_step(do_skip=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return total / n

    def _backward(self, batch: Mapping[str, torch.Tensor], loss_fn: LossFn) -> float:
        """Forward and backward of one (physical) batch; per-sample gradients checked."""
        n = batch_size_of(batch)
        losses = loss_fn(self.model, batch)
        if losses.shape != (n,):
            raise ValueError(
                f"loss_fn returned shape {tuple(losses.shape)}; DP-SGD needs one loss per "
                f"record, shape ({n},) (use per_sequence_lm_loss, not the model's labels= loss)"
            )
        loss = losses.mean()
        loss.backward()
        bad = [
            name
            for name, p in self.model.named_parameters()
            if p.requires_grad
            and (not isinstance(p.grad_sample, torch.Tensor) or p.grad_sample.shape[0] != n)
        ]
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            raise RuntimeError(
                f"per-sample gradients missing or not of batch size {n} for {bad[:5]}"
                f"{' ...' if len(bad) > 5 else ''}: this parameter is not used per record, "
                "so DP-SGD cannot bound its sensitivity; freeze it"
            )
        return float(loss.detach())

    def batches(self) -> Iterator[Any]:
        """One pass over the Poisson loader: ``len(data_loader) = 1 / sample_rate`` batches of
        random size (``N * sample_rate`` on average), empty ones included: hand each to
        :meth:`step`, which turns an empty one into a noise-only step."""
        yield from self.data_loader

    def close(self) -> nn.Module:
        """Remove Opacus' hooks and per-sample attributes; return the original model."""
        return self.model.to_standard_module()


def _set_sampler_generator(loader: DataLoader, generator: torch.Generator) -> None:
    """Make ``loader`` draw its batches from ``generator``: Opacus' Poisson sampler (the
    loader's batch sampler) or a shuffling loader's sampler; a sequential one has none."""
    target = loader.batch_sampler
    if isinstance(target, BatchSampler):
        target = target.sampler
    if hasattr(target, "generator"):
        target.generator = generator


def _prime_empty_batches(private_loader: DataLoader, data_loader: DataLoader) -> None:
    """Teach Opacus' collate wrapper the batch structure before the first batch.

    Opacus builds an empty batch like the first non-empty one; when the very first Poisson
    batch is empty it falls back to one zero tensor per field of ``dataset[0]``, which
    fails on dict records (``torch.zeros(dtype=str)``). Collating record 0 once gives the
    structure (only shapes and dtypes are used: an empty batch has zero rows).
    """
    wrapper = private_loader.collate_fn
    if not isinstance(wrapper, CollateFnWithEmpty) or wrapper.first_batch is not None:
        return
    collate = data_loader.collate_fn or default_collate
    wrapper.first_batch = collate([data_loader.dataset[0]])


def attach_dp_sgd(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    max_grad_norm: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float,
    planned_steps: int | None = None,
    accountant: str = "rdp",
    poisson_sampling: bool = True,
    grad_sample_mode: str = "hooks",
    max_epsilon: float | None = None,
    prior_history: Iterable[Sequence[float]] = (),
    noise_generator: torch.Generator | None = None,
    sampler_generator: torch.Generator | None = None,
    physical_batch_size: int | None = None,
) -> DPSession:
    """Make ``model``'s trainable parameters train with DP-SGD (Abadi et al. 2016) via Opacus.

    Give exactly one of ``noise_multiplier`` or ``target_epsilon``. With ``target_epsilon`` the
    noise multiplier is Opacus' ``get_noise_multiplier`` for ``planned_steps`` at the loader's
    sample rate ``q = 1 / len(data_loader)`` (what Opacus accounts with); pass the total number
    of steps of the whole federated run so every round uses the same noise, and
    ``max_epsilon`` then defaults to ``target_epsilon``. ``max_epsilon`` with ``prior_history``
    (earlier rounds' entries) makes :meth:`DPSession.step` raise
    :class:`PrivacyBudgetExhausted` before the cumulative epsilon would exceed it.

    ``noise_generator`` (on the parameters' device) draws the Gaussian noise and
    ``sampler_generator`` (CPU) the Poisson batches; each defaults to a fresh
    :func:`os_random_generator`, so neither depends on ``torch.manual_seed`` or any shared
    seed. Passing seeded generators makes the run reproducible and voids the DP guarantee
    against anyone who knows the seeds.

    ``physical_batch_size`` bounds the records per forward/backward pass (see
    :meth:`DPSession.step`): the loader's batch size is then the expected logical batch.

    Trainable modules Opacus cannot handle are frozen with a warning
    (:func:`freeze_unsupported_modules`); Opacus' optimizer skips parameters that do not
    require grad, so ``optimizer`` may be built before. Poisson sampling (needed for the
    accounting to hold) yields variable and sometimes empty batches, see
    :meth:`DPSession.step`.
    """
    _check_positive("max_grad_norm", max_grad_norm)
    _check_delta(delta)
    _check_accountant(accountant)
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"grad_sample_mode={grad_sample_mode!r} is invalid: allowed values are "
            f"{', '.join(GRAD_SAMPLE_MODES)}"
        )
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError(
            f"noise_multiplier={noise_multiplier!r}, target_epsilon={target_epsilon!r}: "
            "give exactly one of them"
        )
    if noise_multiplier is not None and (
        not isinstance(noise_multiplier, (int, float))
        or not math.isfinite(noise_multiplier)
        or noise_multiplier < 0
    ):
        raise ValueError(
            f"noise_multiplier={noise_multiplier!r} is invalid: must be a finite number >= 0"
        )
    if target_epsilon is not None:
        _check_positive("target_epsilon", target_epsilon)
        if planned_steps is None:
            raise ValueError("planned_steps is required with target_epsilon")
    _check_count("planned_steps", planned_steps)
    if max_epsilon is not None:
        _check_positive("max_epsilon", max_epsilon)
    _check_count("physical_batch_size", physical_batch_size)
    history = merge_history(prior_history)
    if len(data_loader) == 0:
        raise ValueError("data_loader is empty: DP-SGD needs at least one record")

    model.train()
    frozen = freeze_unsupported_modules(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "no trainable parameters left for DP-SGD"
            + (f" after freezing unsupported modules {frozen}" if frozen else "")
        )
    if not poisson_sampling:
        warnings.warn(
            "poisson_sampling=False: the accountant assumes Poisson sampling, so the reported "
            "epsilon is only an approximation",
            stacklevel=2,
        )

    sample_rate = 1.0 / len(data_loader)
    if target_epsilon is not None:
        noise_multiplier = noise_multiplier_for_budget(
            target_epsilon, delta, sample_rate, int(planned_steps), accountant
        )
        if max_epsilon is None:
            max_epsilon = target_epsilon
    assert noise_multiplier is not None

    if noise_generator is None:
        device = next((p.device for p in model.parameters() if p.requires_grad), "cpu")
        noise_generator = os_random_generator(device)
    if sampler_generator is None:
        sampler_generator = os_random_generator("cpu")
    with warnings.catch_warnings():  # "Secure RNG turned off": see the module docstring
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=accountant)
    private_model, private_opt, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        poisson_sampling=poisson_sampling,
        grad_sample_mode=grad_sample_mode,
        noise_generator=noise_generator,
    )
    _set_sampler_generator(private_loader, sampler_generator)
    _prime_empty_batches(private_loader, data_loader)
    step_limit = None
    if max_epsilon is not None:
        step_limit = steps_until_budget(
            history, (float(noise_multiplier), sample_rate), delta, max_epsilon, accountant
        )
    return DPSession(
        model=private_model,
        optimizer=private_opt,
        data_loader=private_loader,
        privacy_engine=engine,
        noise_multiplier=float(noise_multiplier),
        sample_rate=sample_rate,
        max_grad_norm=float(max_grad_norm),
        delta=float(delta),
        accountant_name=accountant,
        planned_steps=None if planned_steps is None else int(planned_steps),
        max_epsilon=max_epsilon,
        prior_history=history,
        frozen_modules=frozen,
        step_limit=step_limit,
        physical_batch_size=None if physical_batch_size is None else int(physical_batch_size),
    )
