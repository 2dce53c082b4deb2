import math

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
