import math

import numpy as np
import pytest
import torch
from torch import nn

from fatellm_flwr.config import Config
from fatellm_flwr.metrics import (
    CommLedger,
    classification_accuracy,
    perplexity,
    rouge_l,
)
from fatellm_flwr.models import load_tokenizer


class LastTokenLM(nn.Module):
    """A fake LM whose next-token distribution depends only on the current token."""

    def __init__(self, table: dict[int, int], vocab: int):
        super().__init__()
        self.table, self.vocab = table, vocab

    def forward(self, input_ids, attention_mask=None, **_):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for (b, t), tok in zip(torch.cartesian_prod(torch.arange(input_ids.shape[0]),
                                                    torch.arange(input_ids.shape[1])),
                               input_ids.flatten()):
            logits[b, t, self.table.get(int(tok), 0)] = 10.0
        return type("Out", (), {"logits": logits})()


@pytest.fixture()
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir("llama")))


def _single(tok, word):
    ids = tok(word, add_special_tokens=False)["input_ids"]
    return ids


def test_likelihood_accuracy_single_and_multi_token_labels(tok):
    cfg = Config.from_run_config({"eval-batch-size": 2})
    a, b = _single(tok, "a"), _single(tok, "b")
    assert len(a) == len(b) == 1
    labels = ["a", "b"]
    # prompt ending in "x" predicts "a", ending in "y" predicts "b"
    x, y = _single(tok, "x")[0], _single(tok, "y")[0]
    model = LastTokenLM({x: a[0], y: b[0]}, len(tok))
    prompts, gold = ["x", "y", "x", "y"], ["a", "b", "b", "b"]
    assert classification_accuracy(model, tok, prompts, gold, labels, cfg) == 0.75
    # multi-token labels go through full sequence scoring: "ab" vs "ba"
    multi = ["ab", "ba"]
    ids_ab, ids_ba = _single(tok, "ab"), _single(tok, "ba")
    if len(ids_ab) > 1 and len(ids_ba) > 1:
        model = LastTokenLM({x: ids_ab[0], ids_ab[0]: ids_ab[1], y: ids_ba[0],
                             ids_ba[0]: ids_ba[1]}, len(tok))
        assert classification_accuracy(model, tok, ["x", "y"], ["ab", "ba"], multi, cfg) == 1.0


def test_rouge_l_and_perplexity():
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    assert rouge_l(["dogs bark"], ["the cat sat"]) == 0.0
    # LCS "the cat" : P = 2/2, R = 2/3 -> F = 0.8
    assert rouge_l(["the cat"], ["the cat sat"]) == pytest.approx(0.8)
    assert perplexity(math.log(10)) == pytest.approx(10)
    assert math.isnan(perplexity(float("nan")))


def test_comm_ledger_totals_and_json():
    ledger = CommLedger(full_model_bytes=1000)
    ledger.add(1, "a", down=100, up=10)
    ledger.add(1, "b", down=100, up=30)
    t = ledger.round_totals(1)
    assert t["bytes_up"] == 40 and t["bytes_down"] == 200
    assert t["bytes_up_per_client"] == 20 and t["up_pct_of_full_model"] == pytest.approx(2.0)
    again = CommLedger.from_json(ledger.to_json())
    assert again.round_totals(1) == t


def test_fused_loss_and_accuracy_match_the_separate_computations(tiny_model_dir):
    from fatellm_flwr.data import TaskData, tokenize_dataset
    from fatellm_flwr.metrics import _prompt_of, loss_and_label_accuracy
    from fatellm_flwr.models import load_base_model
    from fatellm_flwr.train import evaluate_loss

    path = str(tiny_model_dir("gpt2"))  # absolute positions: padding must not shift them
    tok = load_tokenizer(path)
    model = load_base_model(path)
    labels = ("sport", "business", "tech")
    first = [tok(w, add_special_tokens=False)["input_ids"][0] for w in labels]
    assert len(set(first)) == 3
    cfg = Config.from_run_config({"max-length": 96, "eval-batch-size": 3})
    td = TaskData("classification", labels)
    import datasets

    raw = datasets.Dataset.from_list(
        [{"text": t, "label": lab} for t, lab in [("the team won the match", "sport"),
         ("shares rose in trading today", "business"), ("a new phone", "tech"),
         ("the film got an award . hello", "sport"), ("paris", "tech")]])
    tokd = tokenize_dataset(raw, tok, cfg, td)
    gold = [labels.index(x) for x in raw["label"]]
    loss, acc = loss_and_label_accuracy(model, tokd, gold, first, 2, tok.pad_token_id)
    assert loss == pytest.approx(evaluate_loss(model, tokd, 5, tok.pad_token_id), rel=1e-5)
    # first-token scoring agrees with an independent unpadded forward per example
    preds = []
    for row in raw.to_list():
        ids = torch.tensor([tok(_prompt_of(tok, cfg, td, row), add_special_tokens=False)
                            ["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        preds.append(int(torch.argmax(logits[first])))
    assert acc == pytest.approx(np.mean([p == g for p, g in zip(preds, gold)]))


def test_instruction_task_reports_rouge_l_from_generation(tiny_model_dir):
    import datasets

    from fatellm_flwr.data import TaskData, tokenize_dataset
    from fatellm_flwr.metrics import evaluate_model
    from fatellm_flwr.models import load_base_model

    path = str(tiny_model_dir("llama"))
    tok, model = load_tokenizer(path), load_base_model(path)
    cfg = Config.from_run_config({"max-new-tokens": 4, "max-length": 64})
    raw = datasets.Dataset.from_list([{"instruction": "what is the capital of france ?",
                                       "input": "", "output": "paris is the capital ."}] * 3)
    td = TaskData("instruction", ())
    out = evaluate_model(model, tok, raw, tokenize_dataset(raw, tok, cfg, td), td, cfg)
    assert set(out) == {"loss", "perplexity", "rouge-l"}
    assert 0.0 <= out["rouge-l"] <= 1.0 and np.isfinite(out["loss"])
