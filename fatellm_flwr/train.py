"""Local training and loss evaluation loops shared by every client."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence

import datasets
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .config import Config
from .data import collate
from .device import model_device, to_device

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
ExtraLoss = Callable[[nn.Module], torch.Tensor]
"""A data-independent loss term on the model's weights (e.g. FedIPR's watermark regulariser)."""
_MODEL_KEYS = ("input_ids", "attention_mask", "labels")


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean token cross-entropy over the batch's non-masked labels (HF's own loss)."""
    return model(**to_device(batch, model_device(model))).loss


def batch_iterator(ds: datasets.Dataset, batch_size: int, pad_id: int, seed: int,
                   shuffle: bool = True) -> Iterator[Batch]:
    """Endless batches over ``ds``, reshuffled every pass with a seeded generator."""
    rows = ds.select_columns(list(_MODEL_KEYS))
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(rows)) if shuffle else np.arange(len(rows))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size].tolist()
            yield collate(rows.select(idx).to_list(), pad_id)


def num_local_steps(cfg: Config, num_examples: int) -> int:
    """Optimizer steps per round: ``local-steps``, or ``local-epochs`` worth of batches."""
    if cfg.local_steps > 0:
        return cfg.local_steps
    per_step = cfg.batch_size * cfg.grad_accum
    return max(1, math.ceil(cfg.local_epochs * num_examples / per_step))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int):
    """Constant, linear or cosine decay with linear warm-up, over one round's steps."""
    warm = cfg.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warm) / max(1, total_steps - warm)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_local(model: nn.Module, train_ds: datasets.Dataset, cfg: Config, *, steps: int,
                pad_id: int, seed: int, prox_reference: Sequence[torch.Tensor] | None = None,
                loss_fn: LossFn = causal_lm_loss, desc: str = "local",
                extra_loss: ExtraLoss | None = None) -> dict[str, float]:
    """Train the model's trainable parameters for ``steps`` optimizer steps.

    AdamW with a per-round schedule, gradient accumulation, gradient clipping and an
    optional FedProx proximal term ``mu/2 * ||w - w_global||^2`` (Li et al. 2020).
    ``extra_loss(model)`` (FedIPR's regulariser), when given, is minimised by its own AdamW
    step after every training step (learning rate ``fedipr-lr``, 0 = ``lr``): added to the
    loss instead, Adam's per-coordinate scaling lets the far larger LM gradient drown it.
    Returns the mean training loss and the number of examples seen.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, steps)
    batches = batch_iterator(train_ds, cfg.batch_size, pad_id, seed)
    device = model_device(model)
    model.train()
    losses: list[float] = []
    seen = 0
    extra_opt: torch.optim.Optimizer | None = None
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not sys.stderr.isatty())
    for _ in bar:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            batch = to_device(next(batches), device)
            seen += batch["input_ids"].shape[0]
            loss = loss_fn(model, batch) / cfg.grad_accum
            if prox_reference is not None and cfg.proximal_mu > 0:
                prox = sum(((p - r) ** 2).sum() for p, r in zip(params, prox_reference))
                loss = loss + cfg.proximal_mu / 2 * prox / cfg.grad_accum
            loss.backward()
            step_loss += loss.item()
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"training loss became {step_loss}; lower lr (now {cfg.lr})")
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        if extra_loss is not None:
            extra_opt = _extra_loss_step(model, extra_loss, cfg, extra_opt)
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.3f}")
    model.eval()
    return {"train_loss": float(np.mean(losses)) if losses else float("nan"),
            "train_examples": float(seen)}


@torch.no_grad()
def evaluate_loss(model: nn.Module, ds: datasets.Dataset, batch_size: int,
                  pad_id: int) -> float:
    """Token-weighted mean cross-entropy of the model on ``ds`` (nan when empty)."""
    if len(ds) == 0:
        return float("nan")
    model.eval()
    device = model_device(model)
    total, tokens = 0.0, 0
    rows = ds.select_columns(list(_MODEL_KEYS))
    for start in range(0, len(rows), batch_size):
        batch = collate(rows.select(range(start, min(len(rows), start + batch_size))).to_list(),
                        pad_id)
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n == 0:
            continue
        batch = to_device(batch, device)
        total += model(**batch).loss.item() * n
        tokens += n
    return total / tokens if tokens else float("nan")


def train_local_dp(model: nn.Module, train_ds: datasets.Dataset, cfg: Config, *, steps: int,
                   pad_id: int, seed: int, prior_history: Sequence[Sequence[float]] = (),
                   desc: str = "local-dp",
                   extra_loss: ExtraLoss | None = None) -> tuple[dict[str, float], list]:
    """Sample-level DP-SGD (Abadi et al. 2016) via Opacus on the trainable parameters.

    Poisson-sampled batches of expected size ``batch-size``, per-sample clipping to
    ``dp-max-grad-norm``, Gaussian noise; AdamW on the privatised gradient. Large logical
    batches are processed ``dp-physical-batch-size`` records at a time (virtual batching);
    ``grad-accum`` and the FedProx term do not apply under DP. The accountant's history
    (``prior_history`` + this round) is returned so the caller can persist it; training
    stops early, with a logged message, once ``dp-max-epsilon`` (or the target epsilon)
    would be exceeded. Returns ``(metrics, history)``.

    The noise and the Poisson sampler draw from OS randomness (unpredictable to the server
    and the other clients); ``seed`` seeds them only with ``dp-reproducible-noise=true``,
    which voids the DP guarantee.

    ``extra_loss(model)`` must not depend on the data: Opacus' per-sample gradients would not
    see a term on the weights, so it is minimised by a separate AdamW step (as without DP,
    learning rate ``fedipr-lr``) after every DP step — post-processing of the private
    weights, no privacy cost.
    """
    import logging

    from torch.utils.data import DataLoader

    from .privacy.dp import PrivacyBudgetExhausted, attach_dp_sgd

    log = logging.getLogger(__name__)
    rows = train_ds.select_columns(list(_MODEL_KEYS)).to_list()
    loader = DataLoader(rows, batch_size=cfg.batch_size, shuffle=True,
                        collate_fn=lambda b: collate(b, pad_id))
    sampler_gen = noise_gen = None  # attach_dp_sgd: fresh OS-random generators
    if cfg.dp_reproducible_noise:
        log.warning("dp-reproducible-noise=true: DP-SGD noise and batches are derived from "
                    "the shared seed, so the DP guarantee does not hold")
        sampler_gen = torch.Generator().manual_seed(seed)
        noise_gen = torch.Generator(model_device(model)).manual_seed(seed + 1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    session = attach_dp_sgd(
        model, optimizer, loader, max_grad_norm=cfg.dp_max_grad_norm,
        noise_multiplier=cfg.dp_noise_multiplier or None,
        target_epsilon=cfg.dp_target_epsilon or None, delta=cfg.dp_delta,
        planned_steps=cfg.num_server_rounds * steps, accountant=cfg.dp_accountant,
        max_epsilon=cfg.dp_max_epsilon or None, prior_history=prior_history,
        noise_generator=noise_gen, sampler_generator=sampler_gen,
        physical_batch_size=cfg.dp_physical_batch_size or None)
    losses: list[float] = []
    stopped = ""
    extra_opt: torch.optim.Optimizer | None = None
    try:
        batches = iter(())
        bar = tqdm(range(steps), desc=desc, leave=False, disable=not sys.stderr.isatty())
        for _ in bar:
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(session.batches())
                batch = next(batches, None)
                if batch is None:
                    continue
            try:
                loss = session.step(batch)
            except PrivacyBudgetExhausted as e:
                stopped = str(e)
                log.warning("DP budget reached, local training stops: %s", e)
                break
            if loss is not None:
                losses.append(loss)
            if extra_loss is not None:
                extra_opt = _extra_loss_step(model, extra_loss, cfg, extra_opt)
    finally:
        session.close()
        for p in trainable:  # modules Opacus could not handle were frozen: unfreeze
            p.requires_grad_(True)
        model.eval()
    metrics = {"train_loss": float(np.mean(losses)) if losses else float("nan"),
               "train_examples": float(session.sample_rate * len(rows) * session.steps),
               "dp_epsilon": session.epsilon(), "dp_noise_multiplier": session.noise_multiplier,
               "dp_steps": float(session.steps), "dp_budget_reached": float(bool(stopped))}
    return metrics, session.history()


def _extra_loss_step(model: nn.Module, extra_loss: ExtraLoss, cfg: Config,
                     optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer:
    """One AdamW step (learning rate ``fedipr-lr``, 0 = ``lr``) on ``extra_loss(model)``
    alone, over the parameters it touches (the optimizer is built on the first call and
    returned for the next ones)."""
    value = extra_loss(model)
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(value, params, allow_unused=True)
        touched = [p for p, g in zip(params, grads) if g is not None]
        optimizer = torch.optim.AdamW(touched, lr=cfg.fedipr_lr or cfg.lr, weight_decay=0.0)
        value = extra_loss(model)
    optimizer.zero_grad(set_to_none=True)
    value.backward(inputs=[p for g in optimizer.param_groups for p in g["params"]])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer
