"""Privacy end to end in the simulation engine: DP-SGD + client-level DP + SecAgg+."""

import json

import numpy as np
import pytest


def _cfg(model, data, out, name, **extra):
    return {"model": str(model), "dataset": str(data), "test-size": 15, "max-examples": 0,
            "num-server-rounds": 2, "local-steps": 3, "batch-size": 4, "lr": 5e-3,
            "max-length": 48, "output-dir": str(out), "run-name": name, "partitioner": "iid",
            "min-available-clients": 3, "min-fit-clients": 3, "plots": False,
            "lora-dropout": 0.0, **extra}


def _records(run):
    return json.loads((run / "metrics.json").read_text())


def test_dp_sgd_with_client_side_clipping_under_secagg(run_flwr, tiny_model_dir,
                                                      tiny_classification_file, tmp_path):
    out = tmp_path / "out"
    run_flwr(_cfg(tiny_model_dir("llama"), tiny_classification_file, out, "all",
                  **{"dp-sgd": True, "dp-noise-multiplier": 1.0, "client-dp": "client-fixed",
                     "client-dp-clip-norm": 0.5, "client-dp-noise-multiplier": 0.5,
                     "secure-aggregation": True, "secagg-max-weight": 100.0}))
    rounds = _records(out / "all")[1:]
    assert [r["clients_ok"] for r in rounds] == [3, 3]
    assert all(r["distinct_updates_seen"] == 1 for r in rounds)
    eps = [r["fit_dp_epsilon"] for r in rounds]
    assert 0 < eps[0] < eps[1]
    ceps = [r["client_dp_epsilon"] for r in rounds]
    assert 0 < ceps[0] < ceps[1]
    assert all(np.isfinite(r["server_loss"]) for r in rounds)


def test_server_side_adaptive_clipping_moves_the_clip_norm(run_flwr, tiny_model_dir,
                                                          tiny_classification_file, tmp_path):
    out = tmp_path / "out"
    run_flwr(_cfg(tiny_model_dir("llama"), tiny_classification_file, out, "adaptive",
                  **{"client-dp": "server-adaptive", "client-dp-clip-norm": 100.0,
                     "client-dp-noise-multiplier": 0.1, "server-eval": False}))
    rounds = _records(out / "adaptive")[1:]
    norms = [r["client_dp_clip_norm"] for r in rounds]
    # updates are far smaller than 100: the adaptive norm shrinks towards them
    assert norms[0] < 100.0 and norms[1] < norms[0]
    assert all(r["client_dp_epsilon"] > 0 for r in rounds)


def test_client_adaptive_defaults_with_few_clients_and_the_real_sampling_rate(
        run_flwr, tiny_model_dir, tiny_classification_file, tmp_path):
    """Adaptive clipping with the default noise multiplier starts with 3 clients (it needed
    11+), and the client-level epsilon uses the rate Flower samples at: fraction-fit 0.5 of
    3 available trains max(int(1.5), 2) = 2 clients, q = 2/3 (not 0.5)."""
    from opacus.accountants import RDPAccountant

    out = tmp_path / "out"
    run_flwr(_cfg(tiny_model_dir("llama"), tiny_classification_file, out, "rate",
                  **{"client-dp": "client-adaptive", "fraction-fit": 0.5,
                     "min-fit-clients": 2, "server-eval": False}))
    rounds = _records(out / "rate")[1:]
    assert [r["clients_ok"] for r in rounds] == [2, 2]
    acc = RDPAccountant()
    for r in rounds:
        assert r["client_dp_sampling_rate"] == 2 / 3
        acc.step(noise_multiplier=1.0, sample_rate=2 / 3)
        assert r["client_dp_epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert rounds[0]["client_dp_clip_norm"] != 1.0  # the adaptive norm moved
