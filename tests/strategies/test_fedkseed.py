"""FedKSeed server: aggregation = FedAvg of the clients' models, payload validation, the
per-node difference protocol, checkpoints/resume and the saved model (tiny model, in process).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from transformers import AutoModelForCausalLM

from fatellm_flwr import zo
from fatellm_flwr.clients import fedkseed as cf
from fatellm_flwr.config import Config, ConfigError
from fatellm_flwr.outputs import RunDir
from fatellm_flwr.server_app import build_strategy
from fatellm_flwr.strategies.fedkseed import (
    COEFFS_FILE,
    FedKSeedStrategy,
    SeedServer,
    check_fedkseed_config,
)
from fatellm_flwr.testing import FakeClientManager as Manager
from fatellm_flwr.testing import FakeProxy as Proxy
from fatellm_flwr.wire import fedkseed as wf


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cf.clear_model_cache()
    yield
    cf.clear_model_cache()
    torch.set_num_threads(threads)


def make_cfg(model, data, tmp_path, **extra):
    return Config.from_run_config({
        "algorithm": "fedkseed", "model": str(model), "dataset": str(data), "test-size": 12,
        "max-examples": 0, "partitioner": "iid", "local-steps": 6, "batch-size": 4,
        "max-length": 48, "zo-lr": 1e-3, "zo-eps": 1e-3, "zo-num-seeds": 32,
        "min-fit-clients": 3, "min-available-clients": 3, "output-dir": str(tmp_path / "out"),
        "run-name": "fk", "plots": False, **extra})


def fit_all(strategy, cfg, rnd, manager, params, snapshot=False):
    """One round in process: every sampled client fits; returns results (+ client models)."""
    results, models = [], []
    for proxy, ins in strategy.configure_fit(rnd, params, manager):
        client = cf.FedKSeedClient(cfg, int(proxy.cid), len(manager.proxies))
        arrays, n, metrics = client.fit(parameters_to_ndarrays(ins.parameters), ins.config)
        if snapshot:  # this client's local model (the process cache holds it until the next)
            models.append([p.detach().clone() for p in cf.process_model(cfg).params])
        results.append((proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n,
                                      metrics)))
    return results, models


def test_aggregate_equals_weighted_average_of_client_models(tiny_model_dir,
                                                            tiny_classification_file, tmp_path):
    cfg = make_cfg(tiny_model_dir("llama"), tiny_classification_file, tmp_path,
                   **{"server-eval": False, "partitioner": "dirichlet",
                      "dirichlet-alpha": 0.3})
    s = FedKSeedStrategy(cfg, RunDir(tmp_path / "run"))
    manager = Manager(3)
    params = s.initialize_parameters(manager)
    for rnd in (1, 2):
        results, models = fit_all(s, cfg, rnd, manager, params, snapshot=True)
        weights = np.array([r.num_examples for _, r in results], dtype=np.float64)
        assert len(set(weights)) > 1  # unequal partitions: the weighting matters
        params, _ = s.aggregate_fit(rnd, results, [])
        s.zmodel.move_to(parameters_to_ndarrays(params)[0])
        for i, p in enumerate(s.zmodel.params):
            ref = sum(w * m[i].double() for w, m in zip(weights, models)) / weights.sum()
            torch.testing.assert_close(p.double(), ref, rtol=0, atol=2e-6)
        # and the update is not trivially small: the clients really moved
        assert max((m[0] - models[1][0]).abs().max().item() for m in models) > 1e-4


def test_seed_server_aggregate_matches_numpy_reference():
    rng = np.random.default_rng(0)
    k, lr = 50, 1e-2
    server = SeedServer(k, lr, bias_loss_clip=1.5)
    uploads = [(rng.integers(0, k, n), rng.normal(size=n), w) for n, w in
               [(7, 10), (12, 30), (0, 5)]]
    delta = server.aggregate(uploads)
    ref = np.zeros(k)
    total = sum(w for *_, w in uploads)
    for idx, g, w in uploads:
        for i, v in zip(idx, g):
            ref[i] += lr * w / total * v
    np.testing.assert_allclose(delta, ref, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(delta, delta.astype(np.float32))  # exactly what travels
    assert server.version == 1 and server.history.counts.sum() == 19
    np.testing.assert_array_equal(server.coeffs, delta)


def test_download_sends_differences_to_known_nodes_and_full_vector_otherwise():
    rng = np.random.default_rng(1)
    k = 4096
    server = SeedServer(k, 1e-3)
    arrays, config = server.download("a", None)
    assert arrays == [] and config[wf.KEY_DELTA] == "none" and config[wf.KEY_BASE] == 0
    server.synced("a", 0)
    server.aggregate([(rng.integers(0, k, 200), rng.normal(size=200), 1)])
    server.synced("a", 1)
    server.aggregate([(rng.integers(0, k, 200), rng.normal(size=200), 1)])
    probs = wf.encode_probabilities(server.history)
    assert probs.dtype == np.uint8 and probs.shape == (k,)
    arrays, config = server.download("a", probs)  # known at version 1: only round 2's seeds
    assert config[wf.KEY_BASE] == 1 and config[wf.KEY_VERSION] == 2
    assert config[wf.KEY_DELTA] == "sparse" and arrays[0].dtype == np.uint16
    assert len(arrays[0]) <= 200 and arrays[-1] is probs
    coeff_arrays, q = wf.split_download(arrays, config)
    got = wf.decode_coefficients(coeff_arrays, config[wf.KEY_DELTA], k)
    np.testing.assert_allclose(server._snapshots[1] + got, server.coeffs, rtol=0, atol=1e-12)
    assert q is probs
    full, fconfig = server.download("stranger", None)  # unknown: everything since x0
    assert fconfig[wf.KEY_BASE] == 0
    np.testing.assert_allclose(wf.decode_coefficients(full, fconfig[wf.KEY_DELTA], k),
                               server.coeffs, rtol=1e-6, atol=1e-12)
    # snapshots are kept only for versions some node holds
    server.forget("a")
    assert set(server._snapshots) == {0, 2}
    # dense when most seeds changed (cheaper than 6 bytes per seed)
    dense, mode = wf.encode_coefficients(rng.normal(size=k))
    assert mode == "dense" and dense[0].dtype == np.float32 and dense[0].shape == (k,)


def test_check_result_rejects_bad_payloads(tiny_model_dir, tiny_classification_file, tmp_path):
    cfg = make_cfg(tiny_model_dir("llama"), tiny_classification_file, tmp_path,
                   **{"server-eval": False, "zo-grad-clip": 100.0})
    s = FedKSeedStrategy(cfg, RunDir(tmp_path / "run"))
    ok = wf.encode_upload([0, 31, 5], [0.5, -2.0, 99.0])
    assert s.check_result(ok) is None
    assert s.check_result(wf.encode_upload([], [])) is None  # every step skipped
    bad = {
        "count": [ok[0]],
        "lengths": [ok[0], ok[1][:2]],
        "index high": wf.encode_upload([0, 32], [1.0, 1.0]),
        "index negative": wf.encode_upload([-1], [1.0]),
        "nan": wf.encode_upload([1, 2], [1.0, np.nan]),
        "inf": wf.encode_upload([1], [np.inf]),
        "float indices": [np.array([1.0, 2.0]), np.array([1.0, 2.0], np.float32)],
        "2-D": [np.zeros((2, 1), np.int32), np.zeros((2, 1), np.float32)],
        "too many steps": wf.encode_upload(np.zeros(7, int), np.zeros(7)),
        "above grad clip": wf.encode_upload([3], [101.0]),
    }
    for name, arrays in bad.items():
        assert s.check_result(arrays) is not None, name
    # a bad client is dropped, the round goes on with the others
    manager = Manager(2)
    s.configure_fit(1, s.initialize_parameters(manager), manager)
    res = [(Proxy("0"), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(ok), 10, {})),
           (Proxy("1"), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(bad["nan"]), 10,
                               {}))]
    params, _ = s.aggregate_fit(1, res, [])
    coeffs = parameters_to_ndarrays(params)[0]
    np.testing.assert_allclose(coeffs[[0, 31, 5]], 1e-3 * np.array([0.5, -2.0, 99.0]),
                               rtol=1e-6)
    assert s._pending[1]["clients_ok"] == 1 and s._pending[1]["clients_failed"] == 1


def test_config_combinations_are_rejected():
    base = {"algorithm": "fedkseed"}
    for extra, pattern in [({"quantization": "4bit"}, "quantization='none'"),
                           ({"dp-sgd": True, "dp-noise-multiplier": 1.0}, "dp-sgd"),
                           ({"client-dp": "server-fixed"}, "client-dp"),
                           ({"aggregator": "fedadam"}, "aggregator")]:
        with pytest.raises(ConfigError, match=pattern):
            check_fedkseed_config(Config.from_run_config({**base, **extra}))
    with pytest.raises(ConfigError, match="zo-lr"):
        Config.from_run_config({"zo-lr": 0.0})


def test_checkpoint_resume_and_final_model(tiny_model_dir, tiny_classification_file, tmp_path):
    cfg = make_cfg(tiny_model_dir("llama"), tiny_classification_file, tmp_path,
                   **{"num-server-rounds": 2})
    s, _ = build_strategy(cfg)
    manager = Manager(3)
    params = s.initialize_parameters(manager)
    s.evaluate(0, params)
    for rnd in (1, 2):
        results, _ = fit_all(s, cfg, rnd, manager, params)
        params, _ = s.aggregate_fit(rnd, results, [])
        s.evaluate(rnd, params)
    s.finish()
    run = s.run.path
    assert (run / "round-001" / COEFFS_FILE).exists() and (run / "round-002" / COEFFS_FILE).exists()
    records = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[2]["bytes_up_per_client"] == 8 * 6 + 256
    assert records[2]["up_pct_of_full_model"] < 1.0

    resumed, left = build_strategy(cfg.replace(num_server_rounds=3, resume_from=str(run)))
    assert left == 1 and resumed.round_offset == 2
    np.testing.assert_array_equal(resumed.server.coeffs, s.server.coeffs)
    assert resumed.server.version == s.server.version == 2 and resumed.run_id == s.run_id
    for k, v in s.server.history.to_arrays().items():
        np.testing.assert_array_equal(resumed.server.history.to_arrays()[k], v)
    # after a resume every node gets the full vector once
    ins = resumed.configure_fit(1, resumed.initialize_parameters(manager), manager)
    assert all(i.config[wf.KEY_BASE] == 0 and i.config[wf.KEY_VERSION] == 2 for _, i in ins)
    assert all(i.config["server-round"] == 3 for _, i in ins)

    # the final model: loadable by transformers, equal to x0 replayed with the saved C
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    assert (run / "final" / "tokenizer_config.json").exists()
    with np.load(run / "final" / COEFFS_FILE) as z:
        coeffs, meta = z["coeffs"], json.loads(str(z["meta"]))
    x0 = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    seeds = zo.candidate_seeds(meta["zo_num_seeds"], meta["seed"])
    zo.apply_seed_updates(zo.zo_parameters(x0, meta["zo_exclude_embeddings"]),
                          {int(seeds[i]): float(coeffs[i]) for i in np.flatnonzero(coeffs)})
    got = dict(final.named_parameters())
    for name, p in x0.named_parameters():
        torch.testing.assert_close(got[name], p, rtol=0, atol=1e-6)
    assert any(not torch.equal(p, q) for (_, p), (_, q) in
               zip(x0.named_parameters(),
                   AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
                   .named_parameters()))
