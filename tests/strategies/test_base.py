"""TrackedStrategy around Flower's aggregators: FedAvg reference, bad clients, checkpoints."""

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from fatellm_flwr.config import Config
from fatellm_flwr.outputs import RunDir
from fatellm_flwr.strategies.base import TrackedStrategy
from fatellm_flwr.strategies.homo import HomoStrategy, build_aggregator
from fatellm_flwr.testing import FakeProxy as Proxy


def fit_res(arrays, n):
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, {"train_loss": 1.0})


def make(tmp_path, initial, **cfg):
    config = Config.from_run_config({"server-eval": False, **cfg})
    inner = build_aggregator(config, initial)
    return TrackedStrategy(config, inner, RunDir(tmp_path / "run"), initial, full_model_bytes=1)


def test_weighted_fedavg_equals_numpy_reference(tmp_path):
    rng = np.random.default_rng(0)
    initial = [np.zeros((3, 4), np.float32), np.zeros(5, np.float32)]
    clients = [[rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=5).astype(np.float32)]
               for _ in range(3)]
    weights = [10, 30, 60]
    s = make(tmp_path, initial)
    params, metrics = s.aggregate_fit(1, [(Proxy(str(i)), fit_res(c, w))
                                          for i, (c, w) in enumerate(zip(clients, weights))], [])
    got = parameters_to_ndarrays(params)
    for j in range(2):
        ref = sum(w * c[j].astype(np.float64) for c, w in zip(clients, weights)) / sum(weights)
        np.testing.assert_allclose(got[j], ref, rtol=1e-6)
    assert metrics["train_loss"] == 1.0


def test_bad_clients_are_dropped_and_round_goes_on(tmp_path, caplog):
    initial = [np.zeros((2, 2), np.float32)]
    s = make(tmp_path, initial)
    good = [np.ones((2, 2), np.float32)]
    nan = [np.full((2, 2), np.nan, np.float32)]
    wrong = [np.ones((3, 2), np.float32)]
    params, _ = s.aggregate_fit(1, [(Proxy("a"), fit_res(good, 5)), (Proxy("b"), fit_res(nan, 5)),
                                    (Proxy("c"), fit_res(wrong, 5))], [RuntimeError("boom")])
    np.testing.assert_array_equal(parameters_to_ndarrays(params)[0], good[0])
    assert s._pending[1]["clients_ok"] == 1 and s._pending[1]["clients_failed"] == 3
    # nobody usable: keep the previous global state
    params, _ = s.aggregate_fit(2, [(Proxy("b"), fit_res(nan, 5))], [])
    assert params is None
    np.testing.assert_array_equal(s.current[0], good[0])


def test_evaluate_checkpoints_each_round_and_split_round_trips(tmp_path):
    initial = [np.arange(4, dtype=np.float32)]
    s = make(tmp_path, initial)
    s.evaluate(0, ndarrays_to_parameters(initial))
    s.aggregate_fit(1, [(Proxy("a"), fit_res([initial[0] + 1], 1))], [])
    s.evaluate(1, ndarrays_to_parameters(s.current))
    done, arrays, meta = s.run.load_checkpoint()
    glob, _ = TrackedStrategy.split_checkpoint(arrays)
    assert done == 1 and meta["algorithm"] == "homo"
    np.testing.assert_array_equal(glob[0], initial[0] + 1)
    assert [r["round"] for r in s.run.records] == [0, 1]
    assert s.run.records[1]["bytes_up"] > 0


@pytest.mark.parametrize("aggregator", ["fedadam", "fedyogi", "fedavgm"])
def test_server_optimizers_move_towards_clients_and_keep_state(tmp_path, aggregator):
    initial = [np.zeros(4, np.float32)]
    s = make(tmp_path, initial, aggregator=aggregator, **{"server-lr": 0.1})
    target = [np.ones(4, np.float32)]
    for rnd in (1, 2):
        s.aggregate_fit(rnd, [(Proxy("a"), fit_res(target, 1))], [])
    assert np.all(s.current[0] > 0) and np.all(s.current[0] < 1.5)
    s.__class__ = HomoStrategy  # reuse its optimizer-state hooks without loading a model
    state = s.strategy_state()
    assert state, "optimizer moments must be checkpointed"
    fresh = make(tmp_path, s.current, aggregator=aggregator, **{"server-lr": 0.1})
    fresh.__class__ = HomoStrategy
    fresh.load_strategy_state(state)
    for key in ("m_t", "v_t", "momentum_vector"):
        if getattr(s.inner, key, None) is not None:
            np.testing.assert_array_equal(getattr(fresh.inner, key)[0], getattr(s.inner, key)[0])
    assert isinstance(build_aggregator(Config(), initial), FedAvg)


def test_proximal_mu_has_one_source_the_run_config(tmp_path, tiny_model_dir):
    """FedProx's mu comes from the run config every party validates; the server does not send
    a second copy with each fit (issue 9.7: the copy was never read)."""
    from fatellm_flwr.testing import FakeClientManager

    cfg = Config.from_run_config({"model": str(tiny_model_dir("llama")), "server-eval": False,
                                  "aggregator": "fedprox", "proximal-mu": 0.1})
    s = HomoStrategy(cfg, RunDir(tmp_path / "run"))
    manager = FakeClientManager(2)
    for _, ins in s.configure_fit(1, s.initialize_parameters(manager), manager):
        assert not any("prox" in k for k in ins.config), ins.config
