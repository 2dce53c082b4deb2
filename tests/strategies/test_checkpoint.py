"""A resumed run equals an uninterrupted one, for every server aggregator (issue 9, defect 3).

The server optimizers keep state across rounds (FedAdam/FedYogi moments with a bias
correction that depends on the round number, FedAvgM's momentum that is reset in round 1):
a run stopped after k rounds and resumed from its checkpoint must end where N straight
rounds end.
"""

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fatellm_flwr.config import Config
from fatellm_flwr.outputs import RunDir
from fatellm_flwr.strategies.base import TrackedStrategy
from fatellm_flwr.strategies.homo import build_aggregator
from fatellm_flwr.testing import FakeClientManager

TARGETS = [np.array([1.0, -2.0, 0.5, 3.0], np.float32), np.array([0.2, 0.4, -1.0, 1.0],
                                                                 np.float32)]
WEIGHTS = [10, 30]


def _strategy(cfg: Config, run: RunDir, initial, offset=0, state=None) -> TrackedStrategy:
    s = TrackedStrategy(cfg, build_aggregator(cfg, initial), run, initial, full_model_bytes=1,
                        round_offset=offset)
    if state:
        s.load_strategy_state(state)
    return s


def _rounds(s: TrackedStrategy, rounds: int) -> None:
    """Drive ``rounds`` Flower rounds (numbered from 1, as Flower does in every run)."""
    manager = FakeClientManager(2)
    for server_round in range(1, rounds + 1):
        ins = s.configure_fit(server_round, ndarrays_to_parameters(s.current), manager)
        results = []
        for (proxy, fit_ins), target, n in zip(ins, TARGETS, WEIGHTS):
            (received,) = parameters_to_ndarrays(fit_ins.parameters)
            trained = received + 0.5 * (target - received)  # a client that depends on the state
            results.append((proxy, FitRes(Status(Code.OK, ""),
                                          ndarrays_to_parameters([trained]), n, {})))
        params, _ = s.aggregate_fit(server_round, results, [])
        s.evaluate(server_round, params)  # records and checkpoints the round


def _resume(cfg: Config, path) -> TrackedStrategy:
    run = RunDir(path)
    done, arrays, _ = run.load_checkpoint()
    glob, state = TrackedStrategy.split_checkpoint(arrays)
    return _strategy(cfg, run, glob, offset=done, state=state)


@pytest.mark.parametrize("aggregator", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, aggregator):
    extra = {"server-momentum": 0.9, "server-lr": 1.0} if aggregator == "fedavgm" else {
        "server-lr": 0.1}
    if aggregator == "fedprox":
        extra["proximal-mu"] = 0.01
    cfg = Config.from_run_config({"server-eval": False, "aggregator": aggregator,
                                  "num-server-rounds": 5, **extra})
    initial = [np.zeros(4, np.float32)]
    straight = _strategy(cfg, RunDir(tmp_path / "straight"), initial)
    _rounds(straight, 5)

    first = _strategy(cfg, RunDir(tmp_path / "split"), initial)
    _rounds(first, 2)
    resumed = _resume(cfg, tmp_path / "split")
    assert resumed.round_offset == 2
    _rounds(resumed, 3)

    np.testing.assert_allclose(resumed.current[0], straight.current[0], rtol=1e-6, atol=1e-7)
    assert resumed.current[0].dtype == np.float32
    assert [r["round"] for r in resumed.run.records] == [1, 2, 3, 4, 5]
    # the optimizer state carried over equals the uninterrupted run's
    for key, value in straight.strategy_state().items():
        np.testing.assert_allclose(resumed.strategy_state()[key], value, rtol=1e-6, atol=1e-7)
