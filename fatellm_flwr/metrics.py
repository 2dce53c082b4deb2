"""Evaluation metrics (loss, perplexity, accuracy, ROUGE-L) and communication accounting."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
from torch import nn

from .config import Config
from .data import TaskData, collate, encode_example
from .device import model_device, to_device
from .train import evaluate_loss


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped to stay finite for diverged models."""
    return float(math.exp(min(loss, 50.0))) if math.isfinite(loss) else float("nan")


def _label_token_ids(tokenizer, label_names: Sequence[str]) -> list[list[int]]:
    return [tokenizer(name, add_special_tokens=False)["input_ids"] for name in label_names]


@torch.no_grad()
def classification_accuracy(model: nn.Module, tokenizer, prompts: Sequence[str],
                            gold: Sequence[str], label_names: Sequence[str], cfg: Config,
                            mode: str = "likelihood") -> float:
    """Accuracy of predicting ``gold`` labels from rendered ``prompts``.

    ``likelihood``: the label whose tokens have the highest total log-probability after
    the prompt (one forward pass per prompt when every label is a single token, else one
    per candidate). :func:`evaluate_model` uses the cheaper first-token rule of
    :func:`loss_and_label_accuracy` whenever the labels start with distinct tokens.
    ``generation``: greedy generation, correct when the output starts with the gold label
    word (case-insensitive).
    """
    if not prompts:
        return float("nan")
    model.eval()
    if mode == "generation":
        outs = generate(model, tokenizer, prompts, max_new_tokens=max(
            len(t) for t in _label_token_ids(tokenizer, label_names)) + 2,
            batch_size=cfg.eval_batch_size)
        return float(np.mean([o.strip().lower().startswith(g.lower())
                              for o, g in zip(outs, gold)]))
    cand = _label_token_ids(tokenizer, label_names)
    single = all(len(c) == 1 for c in cand) and len({c[0] for c in cand}) == len(cand)
    index = {name: i for i, name in enumerate(label_names)}
    correct = 0
    for start in range(0, len(prompts), cfg.eval_batch_size):
        chunk = list(prompts[start:start + cfg.eval_batch_size])
        if single:
            scores = _next_token_logprobs(model, tokenizer, chunk)[:, [c[0] for c in cand]]
        else:
            scores = torch.stack([_sequence_logprob(model, tokenizer, p, cand) for p in chunk])
        pred = scores.argmax(dim=1).tolist()
        correct += sum(int(p == index[g]) for p, g in
                       zip(pred, gold[start:start + cfg.eval_batch_size]))
    return correct / len(prompts)


def _left_padded(tokenizer, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    n = max(len(i) for i in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (n - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (n - len(i)) + [1] * len(i) for i in ids])
    return {"input_ids": input_ids, "attention_mask": mask}


def _right_padded(ids: Sequence[Sequence[int]], pad: int) -> dict[str, torch.Tensor]:
    """Right padding keeps every real token at its true position (exact for absolute
    position embeddings too)."""
    n = max(len(i) for i in ids)
    return {"input_ids": torch.tensor([list(i) + [pad] * (n - len(i)) for i in ids]),
            "attention_mask": torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids])}


def _logits_at(model, enc: dict[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token after each row's ``positions`` token.

    Soft-prompt PEFT models prepend virtual tokens to the logits: the offset is skipped.
    """
    logits = model(**to_device(enc, model_device(model))).logits
    offset = logits.shape[1] - enc["input_ids"].shape[1]
    rows = torch.arange(logits.shape[0], device=logits.device)
    return torch.log_softmax(logits[rows, positions.to(logits.device) + offset].float(),
                             dim=-1).cpu()


def _next_token_logprobs(model, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompts]
    enc = _right_padded(ids, tokenizer.pad_token_id)
    return _logits_at(model, enc, torch.tensor([len(i) - 1 for i in ids]))


def _sequence_logprob(model, tokenizer, prompt: str, cand: list[list[int]]) -> torch.Tensor:
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    seqs = [p_ids + c for c in cand]
    n = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    device = model_device(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    offset = logits.shape[1] - ids.shape[1]
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    out = []
    for i, c in enumerate(cand):
        pos = torch.arange(len(p_ids) - 1, len(p_ids) - 1 + len(c)) + offset
        out.append(logp[i, pos, torch.tensor(c)].sum())
    return torch.stack(out)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int,
             batch_size: int = 8) -> list[str]:
    """Greedy completions of rendered prompts (left padding), decoded without specials."""
    model.eval()
    outs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        enc = to_device(_left_padded(tokenizer, prompts[start:start + batch_size]),
                        model_device(model))
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id).cpu()
        outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:],
                                       skip_special_tokens=True)
    return outs


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (Lin 2004) via ``rouge_score``."""
    from rouge_score import rouge_scorer

    if not predictions:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure
                          for p, r in zip(predictions, references)]))


@torch.no_grad()
def loss_and_label_accuracy(model: nn.Module, tokenized: datasets.Dataset,
                            gold: Sequence[int], label_first_tokens: Sequence[int],
                            batch_size: int, pad_id: int) -> tuple[float, float]:
    """Loss and likelihood accuracy from ONE forward pass per batch.

    Valid when every label starts with a distinct token: the label scores are then the
    model's next-token log-probabilities right after the prompt, read from the same
    logits that give the loss (the prompt is the ``-100`` prefix of each row's labels).
    """
    model.eval()
    total, tokens, correct = 0.0, 0, 0
    device = model_device(model)
    first = torch.tensor(label_first_tokens, device=device)
    for start in range(0, len(tokenized), batch_size):
        rows = tokenized.select(range(start, min(len(tokenized), start + batch_size)))
        batch = collate(rows.select_columns(["input_ids", "attention_mask", "labels"]).to_list(),
                        pad_id)
        batch = to_device(batch, device)
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits.float()
        logits = logits[:, logits.shape[1] - batch["input_ids"].shape[1]:]  # soft prompts
        labels = batch["labels"]
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        mask = shift_labels != -100
        nll = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask],
                                                reduction="sum")
        total += nll.item()
        tokens += int(mask.sum())
        prompt_len = (labels != -100).int().argmax(dim=1)  # first answer token
        logp = torch.log_softmax(logits[torch.arange(len(rows), device=device),
                                        prompt_len - 1], dim=-1)
        pred = logp[:, first].argmax(dim=1).cpu()
        correct += int((pred == torch.tensor(gold[start:start + len(rows)])).sum())
    return (total / tokens if tokens else float("nan")), correct / max(1, len(tokenized))


def task_metric_name(cfg: Config, task: str) -> str:
    if cfg.eval_metric != "auto":
        return cfg.eval_metric
    return {"classification": "accuracy", "instruction": "rouge-l", "lm": "perplexity"}[task]


def evaluate_model(model: nn.Module, tokenizer, raw: datasets.Dataset,
                   tokenized: datasets.Dataset, task_data: TaskData,
                   cfg: Config) -> dict[str, float]:
    """Loss, perplexity and the task metric of ``model`` on one evaluation set."""
    metric = task_metric_name(cfg, task_data.task)
    first = [c[0] for c in _label_token_ids(tokenizer, task_data.label_names)]
    if (metric == "accuracy" and task_data.task == "classification" and len(raw)
            and cfg.accuracy_by == "likelihood" and len(set(first)) == len(first)):
        index = {name: i for i, name in enumerate(task_data.label_names)}
        gold = [index[str(g)] for g in raw[cfg.label_column]]
        loss, acc = loss_and_label_accuracy(model, tokenized, gold, first, cfg.eval_batch_size,
                                            tokenizer.pad_token_id)
        return {"loss": loss, "perplexity": perplexity(loss), "accuracy": acc}
    loss = evaluate_loss(model, tokenized, cfg.eval_batch_size, tokenizer.pad_token_id)
    out = {"loss": loss, "perplexity": perplexity(loss)}
    if metric in ("accuracy", "rouge-l") and task_data.task != "lm" and len(raw):
        rows = raw.to_list()
        targets = [task_data.prompt_and_target(cfg, r)[1] for r in rows]
        # the exact prompt tokens used in training (same truncation)
        prompts = [_prompt_of(tokenizer, cfg, task_data, r) for r in rows]
        if metric == "accuracy":
            if task_data.task != "classification":
                raise ValueError("eval-metric='accuracy' needs a classification task")
            out["accuracy"] = classification_accuracy(
                model, tokenizer, prompts, targets, task_data.label_names, cfg, cfg.accuracy_by)
        else:
            preds = generate(model, tokenizer, prompts, cfg.max_new_tokens,
                             cfg.eval_batch_size)
            out["rouge-l"] = rouge_l(preds, targets)
    return out


def _prompt_of(tokenizer, cfg: Config, task_data: TaskData, row: dict) -> str:
    """The exact prompt tokens used in training for ``row`` (same truncation)."""
    enc = encode_example(tokenizer, cfg, task_data, row)
    n_prompt = sum(1 for x in enc["labels"] if x == -100)
    return tokenizer.decode(enc["input_ids"][:n_prompt])


# --------------------------------------------------------------------------- communication
def arrays_nbytes(arrays: Sequence[np.ndarray]) -> int:
    """Payload bytes of a list of arrays (what Flower serialises, headers excluded)."""
    return int(sum(np.asarray(a).nbytes for a in arrays))


@dataclass
class CommLedger:
    """Bytes sent down to and up from each client, per round."""

    full_model_bytes: int = 0
    rounds: dict[int, dict[str, dict[str, int]]] = field(default_factory=dict)

    def add(self, server_round: int, client: str, down: int = 0, up: int = 0) -> None:
        rec = self.rounds.setdefault(server_round, {}).setdefault(client, {"down": 0, "up": 0})
        rec["down"] += down
        rec["up"] += up

    def round_totals(self, server_round: int) -> dict[str, float]:
        recs = self.rounds.get(server_round, {}).values()
        up = sum(r["up"] for r in recs)
        down = sum(r["down"] for r in recs)
        n = max(1, len(recs))
        out = {"bytes_up": float(up), "bytes_down": float(down),
               "bytes_up_per_client": up / n, "bytes_down_per_client": down / n}
        if self.full_model_bytes:
            out["up_pct_of_full_model"] = 100.0 * (up / n) / self.full_model_bytes
        return out

    def to_json(self) -> dict:
        return {"full_model_bytes": self.full_model_bytes,
                "rounds": {str(k): v for k, v in self.rounds.items()}}

    @classmethod
    def from_json(cls, data: dict) -> CommLedger:
        return cls(int(data.get("full_model_bytes", 0)),
                   {int(k): v for k, v in data.get("rounds", {}).items()})
