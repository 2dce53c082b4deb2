"""Per-process caches of clients' data are per tokenizer object, never per ``id()``: one
simulation actor alternates between SLMs of different tokenizers (FedMKT), and a freed
tokenizer's id can be reused by the next one."""

import gc

from fatellm_flwr.clients import datasets
from fatellm_flwr.clients.datasets import client_datasets
from fatellm_flwr.config import Config
from fatellm_flwr.models import load_tokenizer
from fatellm_flwr.testing import build_tiny_model


def test_cache_is_per_tokenizer_object_and_dies_with_it(tmp_path, tiny_classification_file):
    gpt2 = build_tiny_model("gpt2", tmp_path / "gpt2", num_layers=1, tokenizer="sentencepiece")
    qwen = build_tiny_model("qwen2", tmp_path / "qwen2", num_layers=1)
    base = {"dataset": str(tiny_classification_file), "test-size": 20, "max-length": 40,
            "partitioner": "iid"}
    cfg_a = Config.from_run_config({**base, "model": str(gpt2)})
    cfg_b = Config.from_run_config({**base, "model": str(qwen)})
    tok_a = load_tokenizer(str(gpt2))
    first = client_datasets(cfg_a, tok_a, 0, 2)
    assert client_datasets(cfg_a, tok_a, 0, 2) is first  # cached for the same tokenizer
    ids_a = [list(e["input_ids"]) for e in first[1]]
    before = len(datasets._TOKENIZED)
    del tok_a, first
    gc.collect()
    assert len(datasets._TOKENIZED) == before - 1  # gone with its tokenizer: no stale alias
    # the other family's tokenizer gets its own token ids, whatever id() it happens to get
    tok_b = load_tokenizer(str(qwen))
    ids_b = [list(e["input_ids"]) for e in client_datasets(cfg_b, tok_b, 0, 2)[1]]
    assert ids_b != ids_a
    # another object of the same tokenizer: its own entry with the same content
    tok_b2 = load_tokenizer(str(qwen))
    again = client_datasets(cfg_b, tok_b2, 0, 2)[1]
    assert [list(e["input_ids"]) for e in again] == ids_b
    assert tok_b in datasets._TOKENIZED and tok_b2 in datasets._TOKENIZED
