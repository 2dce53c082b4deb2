"""OffsiteClient: trains only the adapters, never loads the full model, caches the emulator."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from transformers import AutoModelForCausalLM

import fatellm_flwr.clients.offsite as client_mod
from fatellm_flwr.clients.offsite import OffsiteClient
from fatellm_flwr.config import Config
from fatellm_flwr.outputs import RunDir
from fatellm_flwr.strategies.offsite import OffsiteStrategy
from fatellm_flwr.testing import FakeClientManager as Manager
from fatellm_flwr.testing import build_tiny_model
from fatellm_flwr.wire.common import move_node_records
from fatellm_flwr.wire.offsite import (
    EMULATOR_ARRAYS,
    EMULATOR_META,
    KEY_FROZEN_COUNT,
    METRIC_NEED_EMULATOR,
)


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("offsite-client-llama"), 8)


def make_cfg(model, data, tmp_path, **extra):
    return Config.from_run_config({
        "algorithm": "offsite", "model": str(model), "dataset": str(data), "test-size": 9,
        "max-examples": 0, "max-length": 48, "partitioner": "iid", "offsite-emulator-layers": 2,
        "server-eval": False, "local-steps": 2, "lr": 1e-2, "lora-dropout": 0.0,
        "output-dir": str(tmp_path), "run-name": "r", "min-fit-clients": 2,
        "min-available-clients": 2, **extra})


def context():
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def round_messages(strategy, rnd=1, n=2):
    """``(cid, arrays, config, node records)`` of each fit message of round ``rnd``."""
    ins = strategy.configure_fit(rnd, ndarrays_to_parameters(strategy.current), Manager(n))
    return [(p.cid, parameters_to_ndarrays(i.parameters), i.config, strategy.outbox.take(p.cid))
            for p, i in ins]


def deliver(records, ctx):
    """What the client's node_records_mod does with the records of a message."""
    content = RecordDict()
    for name, record in records.items():
        if name == EMULATOR_ARRAYS:
            content.array_records[name] = record
        else:
            content.config_records[name] = record
    move_node_records(content, ctx.state)
    return ctx


def frozen_of(records):
    names = json.loads(str(records[EMULATOR_META]["names"]))
    return names, [records[EMULATOR_ARRAYS][n].numpy() for n in names]


@pytest.mark.parametrize("lora", [False, True])
def test_fit_trains_only_the_adapters(deep_llama, tiny_classification_file, tmp_path,
                                      monkeypatch, lora):
    cfg = make_cfg(deep_llama, tiny_classification_file, tmp_path,
                   **{"offsite-lora": lora, "fraction-evaluate": 1.0})
    strategy = OffsiteStrategy(cfg, RunDir(tmp_path / "r"))
    (_, arrays, config, records), _ = round_messages(strategy)
    sent_adapters = arrays  # Parameters carry the adapters only
    frozen_names, frozen = frozen_of(records)
    client_mod.clear_emulator_cache()
    with monkeypatch.context() as m:
        m.setattr("fatellm_flwr.models.load_base_model", _boom)
        m.setattr(AutoModelForCausalLM, "from_pretrained", _boom)
        client = OffsiteClient(cfg, partition_id=0, num_partitions=2,
                               context=deliver(records, context()))
        new, n, metrics = client.fit(arrays, config)
    assert n == len(client.train) > 0 and np.isfinite(metrics["train_loss"])
    assert [a.shape for a in new] == [a.shape for a in sent_adapters]
    changed = {name for name, a, b in zip(strategy.adapter_names, new, sent_adapters)
               if not np.array_equal(a, b)}
    assert changed
    if lora:  # LoRA merged into the targeted linear weights; norms untouched
        assert all(name.endswith("proj.weight") for name in changed)
        assert metrics["trainable_params"] < sum(a.size for a in sent_adapters) / 2
    else:
        assert metrics["trainable_params"] == sum(a.size for a in sent_adapters)
    # the frozen part of the client's emulator is exactly what was sent
    emu = dict(next(iter(client_mod._EMULATORS.values())).named_parameters())
    for name, a in zip(frozen_names, frozen):
        if name in emu:
            np.testing.assert_array_equal(emu[name].detach().numpy(), a)
            assert not emu[name].requires_grad
    # client-side evaluation of emulator + adapters on its validation split
    (_, eval_ins), _ = strategy.configure_evaluate(1, ndarrays_to_parameters(new), Manager(2))
    loss, n_val, ev = client.evaluate(new, eval_ins.config)
    assert n_val == len(client.val) > 0 and np.isfinite(loss) and 0 <= ev["accuracy"] <= 1


def _boom(*a, **k):
    raise AssertionError("a client loaded model weights from disk")


def test_emulator_cache_in_node_state_and_fallback(deep_llama, tiny_classification_file,
                                                   tmp_path):
    cfg = make_cfg(deep_llama, tiny_classification_file, tmp_path, **{"local-steps": 1})
    strategy = OffsiteStrategy(cfg, RunDir(tmp_path / "r"))
    (_, arrays, config, records), _ = round_messages(strategy)
    ctx = deliver(records, context())
    client_mod.clear_emulator_cache()
    new, _, _ = OffsiteClient(cfg, 0, 2, context=ctx).fit(arrays, config)
    assert EMULATOR_ARRAYS in ctx.state.array_records
    # round 2 carries adapters only; a fresh process (deployment) rebuilds from context.state
    (_, arrays2, config2, records2), _ = round_messages(strategy, rnd=2)
    assert config2[KEY_FROZEN_COUNT] == 0 and len(arrays2) == len(new) and records2 == {}
    client_mod.clear_emulator_cache()
    new2, n2, m2 = OffsiteClient(cfg, 0, 2, context=ctx).fit(arrays2, config2)
    assert n2 > 0 and METRIC_NEED_EMULATOR not in m2 and len(new2) == len(new)
    # a node that lost its state asks for the frozen part instead of failing
    client_mod.clear_emulator_cache()
    lost, n3, m3 = OffsiteClient(cfg, 1, 2, context=context()).fit(arrays2, config2)
    assert lost == [] and n3 == 0 and m3[METRIC_NEED_EMULATOR] == 1.0
    # process cache hit (another node of this process built it): the node's own state keeps
    # the copy the server sent it, for its next fresh process
    ctx_b = deliver(records, context())
    OffsiteClient(cfg, 0, 2, context=ctx).fit(arrays, config)
    OffsiteClient(cfg, 1, 2, context=ctx_b).fit(arrays, config)
    assert EMULATOR_ARRAYS in ctx_b.state.array_records
    client_mod.clear_emulator_cache()


def test_client_and_server_configs_must_agree(deep_llama, tiny_classification_file, tmp_path):
    cfg = make_cfg(deep_llama, tiny_classification_file, tmp_path)
    strategy = OffsiteStrategy(cfg, RunDir(tmp_path / "r"))
    (_, arrays, config, records), _ = round_messages(strategy)
    client_mod.clear_emulator_cache()
    other = cfg.replace(offsite_emulator_layers=3)
    with pytest.raises(ValueError, match="differs from the server's"):
        OffsiteClient(other, 0, 2, context=deliver(records, context())).fit(arrays, config)
    client_mod.clear_emulator_cache()


def test_dp_sgd_on_the_adapters(deep_llama, tiny_classification_file, tmp_path):
    cfg = make_cfg(deep_llama, tiny_classification_file, tmp_path,
                   **{"dp-sgd": True, "dp-noise-multiplier": 1.0})
    strategy = OffsiteStrategy(cfg, RunDir(tmp_path / "r"))
    (_, arrays, config, records), _ = round_messages(strategy)
    client_mod.clear_emulator_cache()
    ctx = deliver(records, context())
    new, n, metrics = OffsiteClient(cfg, 0, 2, context=ctx).fit(arrays, config)
    sent = arrays
    frozen_names, frozen = frozen_of(records)
    assert metrics["dp_epsilon"] > 0 and metrics["dp_steps"] == 2
    assert any(not np.array_equal(a, b) for a, b in zip(new, sent))
    emu = dict(next(iter(client_mod._EMULATORS.values())).named_parameters())
    for name, a in zip(frozen_names, frozen):
        if name in emu:
            np.testing.assert_array_equal(emu[name].detach().numpy(), a)
    client_mod.clear_emulator_cache()
