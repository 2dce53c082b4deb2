"""DP-SGD inside the FedHomoLLM client: accounting across rounds and the budget stop."""

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from opacus.accountants import RDPAccountant

from fatellm_flwr.clients.homo import HomoClient
from fatellm_flwr.config import Config


def _cfg(model, data, **kw):
    return Config.from_run_config({"model": str(model), "dataset": str(data), "test-size": 12,
                                   "max-examples": 0, "local-steps": 4, "lr": 5e-3,
                                   "max-length": 48, "partitioner": "iid", "dp-sgd": True,
                                   "lora-dropout": 0.0, "num-server-rounds": 2, **kw})


def _ctx() -> Context:
    """A node's own Flower context: its DP history lives in ``context.state``, so no other
    test's client (sharing the process-level fallback) can leak into it."""
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_epsilon_accumulates_over_rounds_and_matches_opacus(tiny_model_dir,
                                                           tiny_classification_file):
    cfg = _cfg(tiny_model_dir("llama"), tiny_classification_file,
               **{"dp-noise-multiplier": 1.2})
    client = HomoClient(cfg, partition_id=0, num_partitions=2, context=_ctx())
    params = client.get_parameters({})
    eps = []
    for rnd in (1, 2):
        new, _, m = client.fit(params, {"server-round": rnd})
        assert any(not np.array_equal(a, b) for a, b in zip(new, params))
        params = new
        eps.append(m["dp_epsilon"])
        q = m["dp_steps"] and 1 / int(np.ceil(len(client.train) / cfg.batch_size))
    acc = RDPAccountant()
    acc.history = [(1.2, q, 8)]  # 2 rounds x 4 steps at the same sample rate
    assert eps[0] < eps[1]
    assert eps[1] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)


def test_budget_stops_training_with_unchanged_adapter(tiny_model_dir, tiny_classification_file):
    cfg = _cfg(tiny_model_dir("llama"), tiny_classification_file,
               **{"dp-noise-multiplier": 0.8, "dp-max-epsilon": 0.5})
    client = HomoClient(cfg, partition_id=1, num_partitions=2, context=_ctx())
    params = client.get_parameters({})
    new, _, m = client.fit(params, {"server-round": 1})
    assert m["dp_budget_reached"] == 1.0 and m["dp_epsilon"] <= 0.5
    if m["dp_steps"] == 0:
        for a, b in zip(new, params):
            np.testing.assert_array_equal(a, b)


def _fit_twice(cfg):
    """Two fresh clients (same config, partition, global state) each train one DP round."""
    first = HomoClient(cfg, partition_id=0, num_partitions=2, context=_ctx())
    params = first.get_parameters({})
    out = [first.fit(params, {"server-round": 1})[0]]
    second = HomoClient(cfg, partition_id=0, num_partitions=2, context=_ctx())
    out.append(second.fit(params, {"server-round": 1})[0])
    return params, out


def test_dp_noise_is_not_derived_from_the_shared_seed(tiny_model_dir, tiny_classification_file):
    """The run config (seed included) is known to the server: two runs of the same client
    with the same config must still draw different noise and batches (before, both were
    seeded from seed + 1000 * round + partition and came out bit-identical)."""
    cfg = _cfg(tiny_model_dir("llama"), tiny_classification_file,
               **{"dp-noise-multiplier": 1.0})
    params, (a, b) = _fit_twice(cfg)
    assert any(not np.array_equal(x, p) for x, p in zip(a, params))
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))


def test_reproducible_noise_key_makes_runs_identical(tiny_model_dir, tiny_classification_file):
    cfg = _cfg(tiny_model_dir("llama"), tiny_classification_file,
               **{"dp-noise-multiplier": 1.0, "dp-reproducible-noise": True})
    params, (a, b) = _fit_twice(cfg)
    assert any(not np.array_equal(x, p) for x, p in zip(a, params))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_physical_batch_size_gives_the_same_round_as_whole_batches(tiny_model_dir,
                                                                   tiny_classification_file):
    """dp-physical-batch-size only bounds memory: with the same (reproducible) noise and
    Poisson batches, a round in chunks of 1 record equals the round on whole batches."""
    kw = {"dp-noise-multiplier": 1.0, "dp-reproducible-noise": True, "batch-size": 6}
    model, data = tiny_model_dir("llama"), tiny_classification_file
    whole = HomoClient(_cfg(model, data, **kw), partition_id=0, num_partitions=2,
                       context=_ctx())
    params = whole.get_parameters({})  # the process caches the model: fix the start point
    new_whole = whole.fit(params, {"server-round": 1})[0]
    chunked = HomoClient(_cfg(model, data, **kw, **{"dp-physical-batch-size": 1}),
                         partition_id=0, num_partitions=2, context=_ctx())
    new_chunked, _, m = chunked.fit(params, {"server-round": 1})
    assert m["dp_steps"] > 0
    assert any(not np.array_equal(x, p) for x, p in zip(new_whole, params))
    for x, y in zip(new_chunked, new_whole):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5)
