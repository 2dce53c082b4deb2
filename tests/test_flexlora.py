"""FlexLoRA aggregation (Bai et al. 2024): products averaged, SVD back to each rank."""

import numpy as np
import pytest

from fatellm_flwr.config import Config, ConfigError
from fatellm_flwr.flexlora import (
    aggregate,
    client_rank,
    lora_pairs,
    product,
    rank_of,
    redistribute,
    truncate,
)

NAMES = ["m.layers.0.q.lora_A.default.weight", "m.layers.0.q.lora_B.default.weight",
         "m.layers.0.v.lora_A.default.weight", "m.layers.0.v.lora_B.default.weight",
         "m.head.modules_to_save.default.bias"]
PAIRS = lora_pairs(NAMES)
ALPHA = 16.0


def state(rng, r, out=12, inp=10, shared_a=None):
    a1 = shared_a if shared_a is not None else rng.normal(size=(r, inp))
    return [a1, rng.normal(size=(out, r)), rng.normal(size=(r, inp)),
            rng.normal(size=(out, r)), rng.normal(size=out)]


def fedavg_of_products(states, weights):
    w = np.asarray(weights, float) / sum(weights)
    prods = [product(s, PAIRS, ALPHA) for s in states]
    return [sum(wc * p[m] for wc, p in zip(w, prods)) for m in range(len(PAIRS))]


def test_pairs():
    assert PAIRS == [(0, 1), (2, 3)]
    with pytest.raises(ValueError, match="no matching"):
        lora_pairs(["x.lora_A.default.weight"])


def test_equal_ranks_equal_fedavg_of_products_when_it_fits_the_rank():
    """Clients sharing each module's A (span of the sum has rank r): FlexLoRA returns
    exactly the plain FedAvg of B·A, to every client."""
    rng = np.random.default_rng(0)
    a_shared = rng.normal(size=(4, 10))
    states = [state(rng, 4, shared_a=a_shared) for _ in range(3)]
    for s in states:
        s[2] = states[0][2]
    weights = [10, 30, 60]
    agg = aggregate(states, weights, PAIRS, ALPHA, rank=4)
    for got, want in zip(product(agg, PAIRS, ALPHA), fedavg_of_products(states, weights)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # arrays outside LoRA pairs: plain weighted mean
    np.testing.assert_allclose(agg[4], sum(w * s[4] for w, s in zip([.1, .3, .6], states)),
                               rtol=1e-6)


def test_general_case_is_the_best_rank_r_approximation():
    rng = np.random.default_rng(1)
    states = [state(rng, r) for r in (2, 4, 8)]
    weights = [1, 1, 2]
    full = fedavg_of_products(states, weights)
    for rank in (2, 4, 8):
        agg = aggregate(states, weights, PAIRS, ALPHA, rank)
        assert agg[0].shape == (rank, 10) and agg[1].shape == (12, rank)
        for got, dw in zip(product(agg, PAIRS, ALPHA), full):
            s = np.linalg.svd(dw, compute_uv=False)
            err = np.linalg.norm(got - dw)
            assert err == pytest.approx(np.sqrt((s[rank:] ** 2).sum()), rel=1e-4, abs=1e-5)
        a = agg[0].astype(np.float64)
        np.testing.assert_allclose(a @ a.T, np.eye(rank), atol=1e-5)  # orthonormal A rows


def test_each_client_gets_its_own_shape_and_truncations_nest():
    rng = np.random.default_rng(2)
    states = [state(rng, r) for r in (4, 8, 16)]
    glob = aggregate(states, [1, 1, 1], PAIRS, ALPHA, rank=16)
    for r in (4, 8, 16):
        mine = redistribute(glob, PAIRS, ALPHA, r)
        assert rank_of(mine, PAIRS) == r
        assert [a.shape for a in mine] == [(r, 10), (12, r), (r, 10), (12, r), (12,)]
        direct = aggregate(states, [1, 1, 1], PAIRS, ALPHA, rank=r)
        for x, y in zip(product(mine, PAIRS, ALPHA), product(direct, PAIRS, ALPHA)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    assert redistribute(glob, PAIRS, ALPHA, 16)[0] is not None


def test_zero_update_keeps_adapter_trainable():
    b, a = truncate(np.zeros((6, 2)), np.ones((2, 5)), rank=4, scale=2.0)
    assert b.shape == (6, 4) and a.shape == (4, 5)
    assert np.all(b == 0) and np.allclose(a @ a.T, np.eye(4), atol=1e-6)


def test_client_rank_and_config():
    cfg = Config.from_run_config({"lora-ranks": "4,8,16"})
    assert cfg.flexlora and cfg.lora_rank_list == [4, 8, 16]
    assert [client_rank(cfg, {}, i) for i in range(3)] == [4, 8, 16]
    assert client_rank(cfg, {"lora-r": "32"}, 0) == 32
    assert client_rank(Config(), {}, 5) == 8
    with pytest.raises(ConfigError, match="partition-id 3"):
        client_rank(cfg, {}, 3)
    with pytest.raises(ConfigError, match="node config lora-r='x'"):
        client_rank(cfg, {"lora-r": "x"}, 0)
    assert not Config.from_run_config({"lora-ranks": "8,8"}).flexlora
    assert Config.from_run_config({"lora-aggregation": "flexlora"}).flexlora
    with pytest.raises(ConfigError, match="lora-ranks='4,x'"):
        Config.from_run_config({"lora-ranks": "4,x"})
    with pytest.raises(ConfigError, match="aggregator='fedadam' cannot run with FlexLoRA"):
        Config.from_run_config({"lora-ranks": "4,8", "aggregator": "fedadam"})
    with pytest.raises(ConfigError, match="needs peft-method='lora'"):
        Config.from_run_config({"lora-aggregation": "flexlora", "peft-method": "ia3"})
    with pytest.raises(ConfigError, match="secure-aggregation or client-dp"):
        Config.from_run_config({"lora-ranks": "4,8", "secure-aggregation": True})


def test_homo_strategy_sends_each_client_its_own_rank(tiny_model_dir, tiny_classification_file,
                                                     tmp_path):
    """HomoStrategy + HomoClients in-process, ranks 4/8/16: round 1 every node gets the
    rank-16 global state (unknown ranks) and truncates it itself; from round 2 each gets
    tensors of its own shape, and the ledger counts those smaller downloads."""
    from flwr.app import Context, RecordDict
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from fatellm_flwr.clients.homo import HomoClient
    from fatellm_flwr.outputs import RunDir
    from fatellm_flwr.strategies.homo import HomoStrategy
    from fatellm_flwr.testing import FakeClientManager

    cfg = Config.from_run_config({
        "model": str(tiny_model_dir("llama")), "dataset": str(tiny_classification_file),
        "lora-ranks": "4,8,16", "test-size": 10, "local-steps": 1, "batch-size": 4,
        "max-length": 32, "partitioner": "iid", "plots": False, "output-dir": str(tmp_path),
        "run-name": "r", "min-fit-clients": 3, "min-available-clients": 3})
    strategy = HomoStrategy(cfg, RunDir.create(str(tmp_path), "r", "homo"))
    manager = FakeClientManager(3)
    params = strategy.initialize_parameters(manager)
    assert rank_of(parameters_to_ndarrays(params), strategy.aggregator.pairs) == 16
    clients = [HomoClient(cfg, i, 3, Context(run_id=1, node_id=i, node_config={},
                                             state=RecordDict(), run_config={}))
               for i in range(3)]
    for rnd in (1, 2):
        ins = strategy.configure_fit(rnd, params, manager)
        got = {p.cid: rank_of(parameters_to_ndarrays(i.parameters), strategy.aggregator.pairs)
               for p, i in ins}
        assert got == ({"0": 16, "1": 16, "2": 16} if rnd == 1 else
                       {"0": 4, "1": 8, "2": 16})
        results = []
        for proxy, fit_ins in ins:
            c = clients[int(proxy.cid)]
            arrays, n, m = c.fit(parameters_to_ndarrays(fit_ins.parameters), fit_ins.config)
            assert rank_of(arrays, strategy.aggregator.pairs) == [4, 8, 16][int(proxy.cid)]
            results.append((proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays),
                                          n, m)))
        params, _ = strategy.aggregate_fit(rnd, results, [])
        assert params is not None and strategy._pending[rnd]["clients_ok"] == 3
    down = {c: v["down"] for c, v in strategy.ledger.rounds[2].items()}
    assert down["0"] < down["1"] < down["2"]
    assert down["2"] == sum(len(t) for t in params.tensors)
