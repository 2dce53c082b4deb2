"""DP-SGD inside the FedHomoLLM client: accounting across rounds and the budget stop."""

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fatellm_flwr.clients.homo import HomoClient
from fatellm_flwr.config import Config


def _cfg(model, data, **kw):
    return Config.from_run_config({"model": str(model), "dataset": str(data), "test-size": 12,
                                   "max-examples": 0, "local-steps": 4, "lr": 5e-3,
                                   "max-length": 48, "partitioner": "iid", "dp-sgd": True,
                                   "lora-dropout": 0.0, "num-server-rounds": 2, **kw})


def test_epsilon_accumulates_over_rounds_and_matches_opacus(tiny_model_dir,
                                                           tiny_classification_file):
    cfg = _cfg(tiny_model_dir("llama"), tiny_classification_file,
               **{"dp-noise-multiplier": 1.2})
    client = HomoClient(cfg, partition_id=0, num_partitions=2)
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
    client = HomoClient(cfg, partition_id=1, num_partitions=2)
    params = client.get_parameters({})
    new, _, m = client.fit(params, {"server-round": 1})
    assert m["dp_budget_reached"] == 1.0 and m["dp_epsilon"] <= 0.5
    if m["dp_steps"] == 0:
        for a, b in zip(new, params):
            np.testing.assert_array_equal(a, b)
