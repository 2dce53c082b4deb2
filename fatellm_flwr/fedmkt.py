"""FedMKT core: top-k logits, token-aligned distillation, teacher selection (no Flower).

FedMKT (Fan et al. 2024, "FedMKT: Federated Mutual Knowledge Transfer for Large and Small
Language Models", arXiv 2406.02224): a server LLM and clients' small LMs (SLMs, possibly
of other families and tokenizers) teach each other through their next-token distributions
on a public set, never through weights or private data. Each round:

1. each client tunes its SLM's LoRA on its private data;
2. it sends its top-k log-probabilities (values + token ids) on the public set, and its
   per-example cross-entropy there;
3. the server aligns them to the LLM's tokenization and vocabulary
   (:mod:`fatellm_flwr.alignment`), picks teachers per example (:func:`teacher_weights`:
   ``greater`` = the SLM with the lowest CE, ``weighted-mean`` = all, weighted by
   ``exp(-CE)``) and distils them into the LLM's LoRA with
   ``loss = (1 - lambda) LM + lambda KD`` (:func:`distill`);
4. the server sends the LLM's top-k, aligned to each client's tokenization, back; each
   client distils it into its SLM the same way.

Numerics (FATE-LLM's issue #144 was NaN logits): log-softmax is taken in float32 before
top-k, teacher distributions are renormalised over their finite, mapped entries only,
positions without a usable alignment and padding are excluded, a step whose loss is not
finite is skipped, and a payload with NaN/Inf is rejected (:mod:`fatellm_flwr.wire.fedmkt`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .alignment import align_topk, cached_alignment, sequence_texts, tokenizer_key, vocab_map
from .config import Config, ConfigError
from .data import TaskData, collate, encode_example

log = logging.getLogger(__name__)

TopK = tuple[np.ndarray, np.ndarray]  # (values [T, k] float32, indices [T, k] int; -1 = none)


def slm_model_for(cfg: Config, node_config: Mapping, partition_id: int) -> str:
    """This client's SLM: node config ``slm-model``, else ``slm-models`` by partition id
    (a single entry serves every client)."""
    if node_config.get("slm-model"):
        return str(node_config["slm-model"])
    models = cfg.slm_model_list
    if len(models) == 1:
        return models[0]
    if not 0 <= partition_id < len(models):
        raise ConfigError(f"slm-models={cfg.slm_models!r} lists {len(models)} models but this "
                          f"client has partition-id {partition_id}: list one per partition, "
                          "a single one for all, or set the node config `slm-model`")
    return models[partition_id]


# --------------------------------------------------------------------------- public set
def public_examples(cfg: Config):
    """``(task data, raw public set)``: ``public-dataset`` (at most fedmkt-public-size
    examples), or by default the first fedmkt-public-size examples of the server's held-out
    test split, which no client receives."""
    from .data import split_pool_and_test

    if not cfg.public_dataset:
        task_data, _, test, _ = split_pool_and_test(cfg)
        return task_data, test.select(range(min(cfg.fedmkt_public_size, len(test))))
    own = cfg.replace(dataset=cfg.public_dataset, test_size=0,
                      max_examples=cfg.fedmkt_public_size, server_eval_dataset="",
                      server_val_size=0)
    task_data, pool, _, _ = split_pool_and_test(own)
    return task_data, pool.select(range(min(cfg.fedmkt_public_size, len(pool))))


def encode_public(tokenizer, cfg: Config, task_data: TaskData, raw) -> list[dict]:
    """Token ids and LM labels (``-100`` on prompts) of the public set with ``tokenizer``;
    every party encodes it the same way, so sequence lengths agree."""
    rows = raw.to_list()
    return [{k: v for k, v in encode_example(tokenizer, cfg, task_data, r).items()
             if k in ("input_ids", "labels")} for r in rows]


# --------------------------------------------------------------------------- top-k
def _batches(examples: Sequence[dict], batch_size: int, pad_id: int):
    for start in range(0, len(examples), batch_size):
        chunk = [dict(e, attention_mask=[1] * len(e["input_ids"]))
                 for e in examples[start:start + batch_size]]
        yield start, collate(chunk, pad_id)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def topk_logprobs(model, examples: Sequence[dict], k: int, batch_size: int,
                  pad_id: int) -> tuple[list[TopK], np.ndarray]:
    """Per example: the top-k float32 log-probabilities and token ids at every position,
    and the mean cross-entropy on its labels (``[N]``; 0 for an example without labels)."""
    model.eval()
    out: list[TopK] = []
    ce = np.zeros(len(examples), dtype=np.float32)
    dev = _device(model)
    for start, batch in _batches(examples, batch_size, pad_id):
        batch = {key: t.to(dev) for key, t in batch.items()}
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
        logits = logits[:, logits.shape[1] - batch["input_ids"].shape[1]:]  # soft prompts
        logp = torch.log_softmax(logits.float(), dim=-1)
        vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
        ce[start:start + len(logp)] = sequence_ce(logp, batch["labels"]).cpu().numpy()
        for b in range(len(logp)):
            n = int(batch["attention_mask"][b].sum())
            out.append((vals[b, :n].cpu().numpy().astype(np.float32),
                        idx[b, :n].cpu().numpy().astype(np.int32)))
    return out, ce


def sequence_ce(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each row on its labels (0 where it has none)."""
    lp, lab = logp[:, :-1], labels[:, 1:]
    mask = lab != -100
    nll = -lp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    count = mask.sum(-1)
    return torch.where(count > 0, nll.sum(-1) / count.clamp(min=1), torch.zeros_like(nll[:, 0]))


def align_sequences(source_tokenizer, target_tokenizer, source_examples: Sequence[dict],
                    target_examples: Sequence[dict], topk: Sequence[TopK]) -> list[TopK]:
    """Each example's source top-k moved onto the target tokenization and vocabulary
    (vocabulary map and DTW alignments cached per tokenizer pair)."""
    vmap = vocab_map(source_tokenizer, target_tokenizer)
    pair = (tokenizer_key(source_tokenizer), tokenizer_key(target_tokenizer))
    out = []
    for src, tgt, (vals, idx) in zip(source_examples, target_examples, topk):
        s_ids, t_ids = src["input_ids"], tgt["input_ids"]
        index, valid = cached_alignment(pair, s_ids, t_ids,
                                        sequence_texts(source_tokenizer, s_ids),
                                        sequence_texts(target_tokenizer, t_ids))
        out.append(align_topk(vals, idx, index, valid, vmap))
    return out


# --------------------------------------------------------------------------- losses
def kd_terms(logq: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
             mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of a student's log-probabilities ``logq [T, V]`` (float32) under a
    sparse teacher ``(values [T, k] log-probabilities, indices [T, k], -1 = none)``.

    The teacher is renormalised over its usable entries (softmax of the values, temperature
    1); positions with none, or with ``mask`` false, are excluded. Returns ``(sum over
    positions, number of positions)``; both finite even for an empty teacher.
    """
    t = min(logq.shape[0], values.shape[0])
    logq, values, indices, mask = logq[:t], values[:t], indices[:t], mask[:t]
    usable = (indices >= 0) & (indices < logq.shape[-1]) & torch.isfinite(values)
    rows = usable.any(-1) & mask
    if not bool(rows.any()):
        return logq.sum() * 0.0, torch.zeros((), device=logq.device)
    v = values[rows].float().masked_fill(~usable[rows], float("-inf"))
    p = torch.softmax(v, dim=-1)
    gathered = logq[rows].gather(-1, indices[rows].clamp(min=0).long())
    per_pos = -(p * gathered.masked_fill(~usable[rows], 0.0)).sum(-1)
    return per_pos.sum(), rows.sum().float()


def teacher_weights(ce: np.ndarray, usable: np.ndarray, selection: str) -> np.ndarray:
    """``[C, N]`` weights of C teachers on N examples from their cross-entropies there.

    ``greater``: 1 for the teacher with the lowest CE (highest reward ``exp(-CE)``), else 0;
    ``weighted-mean``: ``exp(-CE)`` normalised over teachers. Teachers that are not
    ``usable`` on an example (no aligned position, non-finite CE) get 0; an example with
    no usable teacher gets all zeros.
    """
    ce = np.asarray(ce, dtype=np.float64)
    ok = np.asarray(usable, dtype=bool) & np.isfinite(ce)
    w = np.zeros_like(ce)
    if ce.size == 0:
        return w
    if selection == "greater":
        masked = np.where(ok, ce, np.inf)
        best = masked.argmin(axis=0)
        cols = np.arange(ce.shape[1])
        w[best, cols] = ok[best, cols].astype(np.float64)
        return w
    if selection != "weighted-mean":
        raise ValueError(f"unknown fedmkt-selection {selection!r}")
    logits = np.where(ok, -ce, -np.inf)
    top = np.max(logits, axis=0, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(ok, np.exp(logits - top), 0.0)
    total = e.sum(axis=0, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


@dataclass
class Teacher:
    """One teacher of one example: its weight and aligned top-k (on the student's tokens)."""

    weight: float
    topk: TopK


def distill(model, examples: Sequence[dict], teachers: Sequence[Sequence[Teacher]],
            lam: float, lr: float, epochs: int, batch_size: int, pad_id: int,
            max_grad_norm: float = 1.0, seed: int = 0) -> dict[str, float]:
    """Tune ``model``'s trainable parameters on the public ``examples`` with
    ``(1 - lam) * LM + lam * KD`` (AdamW); ``teachers[i]`` teach example ``i``.

    KD of an example = the weighted sum over its teachers of :func:`kd_terms` averaged over
    its usable positions (padding and unaligned positions excluded). A step whose loss is
    not finite is skipped and counted (``distill_skipped_steps``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    dev = _device(model)
    gen = torch.Generator().manual_seed(seed)
    lm_sum = kd_sum = 0.0
    steps = skipped = kd_positions = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(examples), generator=gen).tolist()
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            batch = collate([dict(examples[i], attention_mask=[1] * len(
                examples[i]["input_ids"])) for i in chosen], pad_id)
            batch = {key: t.to(dev) for key, t in batch.items()}
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            logits = logits[:, logits.shape[1] - batch["input_ids"].shape[1]:]
            logq = torch.log_softmax(logits.float(), dim=-1)
            lab = batch["labels"][:, 1:]
            lm_mask = lab != -100
            lm = (-(logq[:, :-1].gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1))
                  [lm_mask].mean() if bool(lm_mask.any()) else logq.sum() * 0.0)
            kd = logq.sum() * 0.0
            taught = 0  # examples of the batch with at least one usable teacher
            for b, i in enumerate(chosen):
                mask = batch["attention_mask"][b].bool()
                had = False
                for t in teachers[i]:
                    if t.weight <= 0:
                        continue
                    vals = torch.as_tensor(t.topk[0], device=dev)
                    idx = torch.as_tensor(t.topk[1], device=dev).long()
                    s, c = kd_terms(logq[b], vals, idx, mask)
                    if float(c) > 0:
                        kd = kd + t.weight * s / c
                        kd_positions += int(c)
                        had = True
                taught += had
            kd = kd / max(1, taught)
            loss = (1.0 - lam) * lm + lam * kd
            if not torch.isfinite(loss):
                skipped += 1
                log.warning("FedMKT distillation: skipping a step with a non-finite loss "
                            "(lm=%s, kd=%s)", float(lm), float(kd))
                opt.zero_grad(set_to_none=True)
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            steps += 1
            lm_sum += float(lm.detach())
            kd_sum += float(kd.detach())
    model.eval()
    n = max(1, steps)
    return {"distill_lm_loss": lm_sum / n if steps else math.nan,
            "distill_kd_loss": kd_sum / n if steps else math.nan,
            "distill_steps": float(steps), "distill_skipped_steps": float(skipped),
            "distill_kd_positions": float(kd_positions)}
