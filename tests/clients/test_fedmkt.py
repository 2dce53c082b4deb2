"""FedMKT's client: payload shape, node state across messages, node config, bad payloads."""

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fatellm_flwr.clients.fedmkt import FedMKTClient
from fatellm_flwr.config import Config
from fatellm_flwr.models import get_trainable_state
from fatellm_flwr.testing import build_tiny_model
from fatellm_flwr.wire.fedmkt import KEY_TEACHER, decode_topk, encode_topk, topk_problem


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, tiny_classification_file):
    tmp = tmp_path_factory.mktemp("fedmkt-client")
    llm = build_tiny_model("llama", tmp / "llm", num_layers=2)
    slm = build_tiny_model("gpt2", tmp / "slm", num_layers=2, tokenizer="sentencepiece")
    return Config.from_run_config({
        "algorithm": "fedmkt", "model": str(llm), "slm-models": str(slm),
        "dataset": str(tiny_classification_file), "test-size": 20, "fedmkt-public-size": 5,
        "fedmkt-top-k": 3, "local-steps": 2, "batch-size": 4, "max-length": 40,
        "partitioner": "iid", "lora-ranks": "2,4"})


def ctx(node_config=None):
    return Context(run_id=1, node_id=3, node_config=node_config or {}, state=RecordDict(),
                   run_config={})


def test_fit_sends_topk_and_keeps_the_adapter_in_node_state(cfg):
    context = ctx()
    client = FedMKTClient(cfg, 1, 2, context=context)
    assert client.rank == 4 and client.slm == cfg.slm_model_list[0]
    arrays, n, metrics = client.fit([], {"server-round": 1})
    lengths = [len(e["input_ids"]) for e in client.public]
    assert topk_problem(arrays, lengths, 3, len(client.tokenizer), with_ce=True) is None
    assert n == len(client.train) and metrics["fedmkt-slm-vocab"] == len(client.tokenizer)
    trained = get_trainable_state(client.model)
    # a fresh client object (a deployment's new process) restores it from context.state
    again = FedMKTClient(cfg, 1, 2, context=context)
    again._restore()
    assert all(np.array_equal(a, b) for a, b in zip(trained, get_trainable_state(again.model)))
    # evaluate: distil a teacher payload, keep the result, report SLM metrics
    topk, _ = decode_topk(arrays)
    down = encode_topk([(v, i.astype(np.int64)) for v, i in topk])
    loss, n_val, m = again.evaluate(down, {"server-round": 1, KEY_TEACHER: True})
    assert np.isfinite(loss) and m["slm_distill_steps"] > 0 and "slm_accuracy" in m
    rec = context.state.array_records["fatellm.fedmkt-slm-adapter"]
    assert not all(np.array_equal(rec[k].numpy(), a) for k, a in zip(rec.keys(), trained))


def test_node_config_and_bad_payload(cfg):
    client = FedMKTClient(cfg, 0, 2, context=ctx({"lora-r": 3}))
    assert client.rank == 3
    bad = encode_topk([(np.zeros((len(e["input_ids"]), 3), np.float32),
                        np.full((len(e["input_ids"]), 3), 10 ** 6)) for e in client.public])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        client.evaluate(bad, {"server-round": 1, KEY_TEACHER: True})


def test_alternating_slms_get_their_own_public_encoding(tmp_path, cfg):
    """One actor serving clients of two SLM families in turn (one model kept at a time):
    each client's public set is encoded by its own tokenizer."""
    from fatellm_flwr.fedmkt import encode_public, public_examples

    other = build_tiny_model("qwen2", tmp_path / "qwen2", num_layers=1)
    mixed = cfg.replace(slm_models=f"{cfg.slm_model_list[0]},{other}")
    for pid in (0, 1, 0, 1):
        client = FedMKTClient(mixed, pid, 2, context=ctx())
        assert client.slm == mixed.slm_model_list[pid]
        task, raw = public_examples(mixed)
        assert client.public == encode_public(client.tokenizer, mixed, task, raw), pid
