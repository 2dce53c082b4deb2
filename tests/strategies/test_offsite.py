"""OffsiteStrategy: what travels to clients, aggregation + plug-in, fallback, resume."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from transformers import AutoModelForCausalLM

from fatellm_flwr.config import Config, ConfigError
from fatellm_flwr.emulator import blocks_prefix
from fatellm_flwr.outputs import RunDir
from fatellm_flwr.strategies.offsite import DISTILLED_FILE, OffsiteStrategy, check_offsite_config
from fatellm_flwr.testing import FakeClientManager as Manager
from fatellm_flwr.testing import FakeProxy as Proxy
from fatellm_flwr.testing import build_tiny_model
from fatellm_flwr.wire.offsite import (
    EMULATOR_ARRAYS,
    EMULATOR_META,
    KEY_ADAPTER_NAMES,
    KEY_FROZEN_COUNT,
    METRIC_NEED_EMULATOR,
)

L = 8


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """Factory: a saved tiny 8-block model of ``arch`` whose every tensor is distinct."""
    cache: dict[str, object] = {}

    def make(arch: str = "llama"):
        if arch not in cache:
            path = build_tiny_model(arch, tmp_path_factory.mktemp(f"offsite-{arch}"), L)
            model = AutoModelForCausalLM.from_pretrained(path)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():  # norms start all-ones: make value checks meaningful
                for p in model.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1 + 1.0 * (p.ndim == 1))
            model.save_pretrained(path)
            cache[arch] = path
        return cache[arch]

    return make


def config(model, data, tmp_path, **extra):
    return Config.from_run_config({
        "algorithm": "offsite", "model": str(model), "dataset": str(data), "test-size": 9,
        "max-examples": 0, "max-length": 48, "partitioner": "iid", "offsite-bottom": 2,
        "offsite-top": 2, "offsite-emulator-layers": 2, "server-eval": False,
        "output-dir": str(tmp_path), "run-name": "r", "min-fit-clients": 2,
        "min-available-clients": 2, "plots": False, **extra})


def make(cfg):
    return OffsiteStrategy(cfg, RunDir(cfg.output_dir + "/" + cfg.run_name))


def fit_res(arrays, n, **metrics):
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n,
                  {"train_loss": 1.0, **metrics})


def block_of(name: str, prefix: str) -> int | None:
    m = re.match(rf"{re.escape(prefix)}\.(\d+)\.", name)
    return int(m.group(1)) if m else None


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied / tied head
def test_messages_carry_no_dropped_block(deep_model, tiny_classification_file, tmp_path, arch):
    s = make(config(deep_model(arch), tiny_classification_file, tmp_path))
    split = s.split
    assert split.dropped_indices() == [3, 4]
    ins = s.configure_fit(1, ndarrays_to_parameters(s.current), Manager(2))
    assert len(ins) == 2
    proxy, first = ins[0]
    adapters = parameters_to_ndarrays(first.parameters)  # Parameters: the adapters only
    # the frozen emulator travels in its own records, queued for this node's message
    records = s.outbox.take(proxy.cid)
    frozen_names = json.loads(str(records[EMULATOR_META]["names"]))
    frozen = [records[EMULATOR_ARRAYS][n].numpy() for n in frozen_names]
    assert str(records[EMULATOR_META]["id"]) == s.emulator_id
    arrays = adapters + frozen
    names = json.loads(first.config[KEY_ADAPTER_NAMES]) + frozen_names
    assert len(adapters) == len(s.adapter_names) and len(frozen) == first.config[KEY_FROZEN_COUNT]
    prefix = blocks_prefix(s.emulator)
    # by name: every block tensor maps to a kept block, never a dropped one
    full_blocks = {split.full_index(b) for b in (block_of(n, prefix) for n in names)
                   if b is not None}
    assert full_blocks == set(split.kept_indices())
    assert ("lm_head.weight" in names) == (arch == "llama")  # untied head travels, tied doesn't
    # by value: no array equals any tensor of a dropped block (all tensors are distinct)
    full = AutoModelForCausalLM.from_pretrained(deep_model(arch))
    dropped = [p.detach().numpy() for n, p in full.named_parameters()
               if block_of(n, prefix) in split.dropped_indices()]
    assert dropped
    for a in arrays:
        assert not any(a.shape == d.shape and np.allclose(a, d) for d in dropped)
    # the adapters are the full model's adapter blocks
    full_params = dict(full.named_parameters())
    for n, a in zip(s.adapter_names, adapters):
        pos = block_of(n, prefix)
        full_name = n.replace(f"{prefix}.{pos}.", f"{prefix}.{split.full_index(pos)}.")
        np.testing.assert_array_equal(a, full_params[full_name].detach().numpy())
    # round 2: the nodes already hold the frozen part -> adapters only
    ins2 = s.configure_fit(2, ndarrays_to_parameters(s.current), Manager(3))
    counts = [i.config[KEY_FROZEN_COUNT] for _, i in ins2]
    assert counts == [0, 0, len(frozen)]  # node 2 is new this round
    assert s.outbox.take("0") == {} and EMULATOR_ARRAYS in s.outbox.take("2")
    assert all(len(i.parameters.tensors) == len(adapters) for _, i in ins2)
    r1, r2 = s.ledger.round_totals(1), s.ledger.round_totals(2)
    per_adapter = sum(a.nbytes for a in adapters)
    assert r1["bytes_down_per_client"] > per_adapter + s.frozen_bytes
    assert s.ledger.rounds[2]["0"]["down"] < per_adapter + 10_000
    assert s.ledger.rounds[2]["2"]["down"] > per_adapter + s.frozen_bytes
    assert r2["bytes_down"] < 3 * r1["bytes_down_per_client"]


def test_aggregate_plugs_adapters_into_full_model(deep_model, tiny_classification_file,
                                                  tmp_path):
    cfg = config(deep_model("llama"), tiny_classification_file, tmp_path, **{"server-eval": True})
    s = make(cfg)
    split, prefix = s.split, blocks_prefix(s.emulator)
    s.evaluate(0, ndarrays_to_parameters(s.current))
    rng = np.random.default_rng(0)
    c1 = [a + rng.normal(0, 0.05, a.shape).astype(np.float32) for a in s.current]
    c2 = [a + rng.normal(0, 0.05, a.shape).astype(np.float32) for a in s.current]
    s.configure_fit(1, ndarrays_to_parameters(s.current), Manager(2))
    params, _ = s.aggregate_fit(1, [(Proxy("0"), fit_res(c1, 10)), (Proxy("1"), fit_res(c2, 30))],
                                [])
    agg = parameters_to_ndarrays(params)
    for a, x, y in zip(agg, c1, c2):
        np.testing.assert_allclose(a, (10 * x + 30 * y) / 40, rtol=1e-5, atol=1e-7)
    s.evaluate(1, params)
    records = json.loads((s.run.path / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1]
    for r in records:
        for what in ("full_zeroshot", "emulator_original", "emulator_tuned", "plugin"):
            assert np.isfinite(r[f"server_{what}_loss"])
            assert 0 <= r[f"server_{what}_accuracy"] <= 1
        assert r["server_loss"] == r["server_plugin_loss"]
    r0, r1 = records
    assert r0["server_plugin_loss"] == r0["server_full_zeroshot_loss"]
    assert r1["server_full_zeroshot_loss"] == r0["server_full_zeroshot_loss"]
    assert r1["server_plugin_loss"] != r0["server_plugin_loss"]
    assert r0["offsite_frozen_emulator_bytes"] == s.frozen_bytes
    # the saved plugged-in model: adapter blocks = aggregate, every other block = original
    saved = dict(AutoModelForCausalLM.from_pretrained(s.run.round_dir(1)).named_parameters())
    orig = dict(AutoModelForCausalLM.from_pretrained(deep_model("llama")).named_parameters())
    written = set()
    for n, a in zip(s.adapter_names, agg):
        pos = block_of(n, prefix)
        full_name = n.replace(f"{prefix}.{pos}.", f"{prefix}.{split.full_index(pos)}.")
        np.testing.assert_allclose(saved[full_name].detach().numpy(), a, rtol=0, atol=1e-7)
        written.add(full_name)
    assert {block_of(n, prefix) for n in written} == set(split.adapter_indices())
    for n, p in orig.items():
        if n not in written:
            assert torch.equal(saved[n], p), n
    assert (s.run.round_dir(1) / "tokenizer.json").exists()
    assert json.loads((s.run.path / "checkpoint.json").read_text())["round"] == 1


def test_client_without_emulator_gets_it_again(deep_model, tiny_classification_file, tmp_path):
    s = make(config(deep_model("llama"), tiny_classification_file, tmp_path))
    s.configure_fit(1, ndarrays_to_parameters(s.current), Manager(2))
    good = [a + 0.01 for a in s.current]
    params, _ = s.aggregate_fit(1, [(Proxy("0"), fit_res(good, 5)),
                                    (Proxy("1"), fit_res([], 0, **{METRIC_NEED_EMULATOR: 1.0}))],
                                [])
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], good[0])
    assert s._pending[1]["clients_need_emulator"] == 1 and s._pending[1]["clients_ok"] == 1
    ins = s.configure_fit(2, params, Manager(2))
    assert [i.config[KEY_FROZEN_COUNT] for _, i in ins] == [0, len(s.frozen_names)]


def test_bad_split_and_combinations_fail_clearly(deep_model, tiny_classification_file,
                                                 tmp_path):
    with pytest.raises(ConfigError, match=r"offsite-emulator-layers=5 .* 8 decoder blocks"):
        make(config(deep_model("llama"), tiny_classification_file, tmp_path,
                    **{"offsite-emulator-layers": 5}))
    with pytest.raises(ConfigError, match=r"offsite-bottom=4, offsite-top=4"):
        make(config(deep_model("llama"), tiny_classification_file, tmp_path,
                    **{"offsite-bottom": 4, "offsite-top": 4, "offsite-emulator-layers": 0}))
    base = {"algorithm": "offsite"}
    for bad, pattern in [({"quantization": "4bit"}, "quantization='none'"),
                         ({"offsite-bottom": 0, "offsite-top": 0}, "no adapter blocks"),
                         ({"offsite-distill": True, "offsite-distill-dataset": "builtin:bbc-news"},
                          "clients' dataset")]:
        with pytest.raises(ConfigError, match=pattern):
            check_offsite_config(Config.from_run_config({**base, **bad}))
    # Parameters hold only the adapters: client-side clipping works with offsite now
    for mode in ("client-fixed", "client-adaptive"):
        check_offsite_config(Config.from_run_config({**base, "client-dp": mode}))


def test_distilled_emulator_and_resume(deep_model, tiny_classification_file, tmp_path):
    from fatellm_flwr.server_app import build_strategy

    public = tmp_path / "public.jsonl"
    public.write_text("\n".join(json.dumps({"text": f"hello how are you ? i am fine {i} ."})
                                for i in range(20)))
    cfg = config(deep_model("llama"), tiny_classification_file, tmp_path,
                 **{"offsite-distill": True, "offsite-distill-dataset": str(public),
                    "offsite-distill-steps": 3, "offsite-distill-lr": 1e-2,
                    "aggregator": "fedadam"})
    s = make(cfg)
    assert len(s.distill_losses) == 3 and (s.run.path / DISTILLED_FILE).exists()
    full = dict(s.full.named_parameters())
    prefix = blocks_prefix(s.emulator)
    emu = dict(s.emulator.named_parameters())
    kept = s.split.emulator_indices()[0]
    name = f"{prefix}.{s.split.bottom}.mlp.down_proj.weight"
    assert not torch.equal(emu[name], full[f"{prefix}.{kept}.mlp.down_proj.weight"])
    s.evaluate(0, ndarrays_to_parameters(s.current))
    assert "offsite_distill_mse_last" in s.run.records[0]
    s.configure_fit(1, ndarrays_to_parameters(s.current), Manager(2))
    update = [a + 0.01 for a in s.current]
    params, _ = s.aggregate_fit(1, [(Proxy("0"), fit_res(update, 5)),
                                    (Proxy("1"), fit_res(update, 5))], [])
    s.evaluate(1, params)
    resumed, left = build_strategy(cfg.replace(resume_from=str(s.run.path),
                                               num_server_rounds=3))
    assert left == 2 and resumed.round_offset == 1
    assert resumed.emulator_id == s.emulator_id  # same distilled emulator, not re-distilled
    for a, b in zip(resumed.current, s.current):
        np.testing.assert_array_equal(a, b)
    assert resumed.aggregator.m_t is not None  # fedadam moments restored
    ins = resumed.configure_fit(1, ndarrays_to_parameters(resumed.current), Manager(2))
    assert all(i.config[KEY_FROZEN_COUNT] > 0 for _, i in ins)  # resumed: frozen part resent
