"""The strategy under SecAgg+: dtype-stable global state, honest byte ledger, failures
counted by node (issue 9, defects 4 and 9)."""

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fatellm_flwr.config import Config
from fatellm_flwr.outputs import RunDir
from fatellm_flwr.strategies.base import TrackedStrategy
from fatellm_flwr.strategies.homo import build_aggregator
from fatellm_flwr.testing import FakeClientManager
from fatellm_flwr.wire.common import METRIC_SECAGG_UP


def _strategy(tmp_path, **cfg) -> TrackedStrategy:
    config = Config.from_run_config({"server-eval": False, "secure-aggregation": True,
                                     "min-fit-clients": 3, "min-available-clients": 3, **cfg})
    initial = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, np.float32)]
    return TrackedStrategy(config, build_aggregator(config, initial), RunDir(tmp_path / "run"),
                           initial, full_model_bytes=1)


def _secagg_results(proxies, delta, masked_bytes=1000):
    """What Flower's SecAgg+ workflow hands the strategy: every result carries the same
    dequantized float64 sum (here of deltas), plus each client's own metrics."""
    summed = ndarrays_to_parameters([d.astype(np.float64) for d in delta])
    return [(p, FitRes(Status(Code.OK, ""), summed, 10, {METRIC_SECAGG_UP: masked_bytes}))
            for p in proxies]


@pytest.mark.parametrize("aggregator", ["fedavg", "fedadam"])
def test_global_state_keeps_its_dtype_under_secagg(tmp_path, aggregator):
    s = _strategy(tmp_path, aggregator=aggregator)
    manager = FakeClientManager(3)
    delta = [np.full((2, 3), 0.25, np.float32), np.full(4, -0.5, np.float32)]
    for rnd in (1, 2):
        ins = s.configure_fit(rnd, ndarrays_to_parameters(s.current), manager)
        params, _ = s.aggregate_fit(rnd, _secagg_results([p for p, _ in ins], delta), [])
        assert [a.dtype for a in parameters_to_ndarrays(params)] == [np.float32, np.float32]
        assert [a.dtype for a in s.current] == [np.float32, np.float32]
        s.evaluate(rnd, params)
    # what travels down in round 2 is as large as in round 1 (no float64 doubling)
    assert s.ledger.rounds[2]["0"]["down"] == s.ledger.rounds[1]["0"]["down"]
    _, arrays, _ = s.run.load_checkpoint()
    glob, _ = TrackedStrategy.split_checkpoint(arrays)
    assert [a.dtype for a in glob] == [np.float32, np.float32]
    if aggregator == "fedavg":
        np.testing.assert_allclose(s.current[1], np.ones(4) - 2 * 0.5)


def test_ledger_counts_the_masked_vectors_that_were_sent(tmp_path):
    s = _strategy(tmp_path)
    ins = s.configure_fit(1, ndarrays_to_parameters(s.current), FakeClientManager(3))
    delta = [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)]
    s.aggregate_fit(1, _secagg_results([p for p, _ in ins], delta, masked_bytes=1234), [])
    assert [s.ledger.rounds[1][c]["up"] for c in ("0", "1", "2")] == [1234] * 3
    assert METRIC_SECAGG_UP not in str(s._pending[1])  # a byte count, not a fit metric


def test_a_failed_client_counts_once_under_secagg(tmp_path):
    s = _strategy(tmp_path)
    ins = s.configure_fit(1, ndarrays_to_parameters(s.current), FakeClientManager(3))
    delta = [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)]
    error = RuntimeError("injected failure")
    # SecAggPlusWorkflow appends each failed node's error twice, without its node id
    failures = [Exception(error), Exception(error)]
    s.aggregate_fit(1, _secagg_results([p for p, _ in ins][:2], delta), failures)
    assert s._pending[1]["clients_ok"] == 2 and s._pending[1]["clients_failed"] == 1
