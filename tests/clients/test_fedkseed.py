"""FedKSeed client: bytes up ~ steps (not K), a client that rebuilds from the full
coefficient vector (fresh process) ends with the same model as a caching client, node
state in a fresh process, the need-full fallback, and exact undo of local steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import (
    Code,
    Context,
    EvaluateRes,
    FitRes,
    RecordDict,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from fatellm_flwr import zo
from fatellm_flwr.clients import fedkseed as cf
from fatellm_flwr.config import Config
from fatellm_flwr.outputs import RunDir
from fatellm_flwr.strategies.base import parameters_nbytes
from fatellm_flwr.strategies.fedkseed import FedKSeedStrategy
from fatellm_flwr.testing import FakeClientManager as Manager
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
        "max-examples": 0, "partitioner": "iid", "local-steps": 5, "batch-size": 4,
        "max-length": 48, "zo-lr": 1e-3, "zo-eps": 1e-3, "zo-num-seeds": 32,
        "min-fit-clients": 2, "min-available-clients": 2, "server-eval": False,
        "output-dir": str(tmp_path / "out"), "run-name": "fk", "plots": False, **extra})


def node_context(pid: int, n: int) -> Context:
    return Context(run_id=1, node_id=pid, node_config={"partition-id": pid, "num-partitions": n},
                   state=RecordDict(), run_config={})


def params_copy(cfg):
    return [p.detach().clone() for p in cf.process_model(cfg).params]


def run_rounds(strategy, cfg, manager, rounds, contexts):
    """``rounds`` in process (clients share this process's model cache, as in a
    simulation actor); each node keeps its Flower context."""
    params = strategy.initialize_parameters(manager)
    for rnd in range(1, rounds + 1):
        results = []
        for proxy, ins in strategy.configure_fit(rnd, params, manager):
            client = cf.FedKSeedClient(cfg, int(proxy.cid), len(manager.proxies),
                                       context=contexts[proxy.cid])
            arrays, n, m = client.fit(parameters_to_ndarrays(ins.parameters), ins.config)
            assert m.get(wf.METRIC_NEED_FULL) is None
            results.append((proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays),
                                          n, m)))
        params, _ = strategy.aggregate_fit(rnd, results, [])
    return params


def test_bytes_up_grow_with_steps_not_with_k(tiny_model_dir, tiny_classification_file,
                                             tmp_path):
    sizes = {}
    for k in (16, 4096):
        for steps in (5, 10):
            cfg = make_cfg(tiny_model_dir("llama"), tiny_classification_file, tmp_path,
                           **{"zo-num-seeds": k, "local-steps": steps})
            client = cf.FedKSeedClient(cfg, 0, 2)
            config = {"server-round": 1, wf.KEY_RUN: "r", wf.KEY_VERSION: 0, wf.KEY_BASE: 0,
                      wf.KEY_DELTA: "none", wf.KEY_PROBS: False}
            arrays, n, metrics = client.fit([], config)
            assert metrics["zo_steps"] == steps and n > 0
            assert arrays[0].dtype == np.int32 and arrays[1].dtype == np.float32
            sizes[(k, steps)] = parameters_nbytes(ndarrays_to_parameters(arrays))
    assert sizes[(16, 5)] == sizes[(4096, 5)] and sizes[(16, 10)] == sizes[(4096, 10)]
    assert sizes[(16, 10)] - sizes[(16, 5)] == 5 * 8  # int32 index + float32 g per step
    assert sizes[(16, 5)] == 5 * 8 + 2 * wf.NPY_HEADER
    # at the paper's 200 steps: under the 4 KB goal
    assert parameters_nbytes(ndarrays_to_parameters(wf.encode_upload(np.arange(200),
                                                                     np.ones(200)))) < 4096


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_fresh_client_rebuilding_from_full_vector_equals_caching_client(
        tiny_model_dir, tiny_classification_file, tmp_path, weight_decay):
    cfg = make_cfg(tiny_model_dir("llama"), tiny_classification_file, tmp_path,
                   **{"zo-weight-decay": weight_decay})
    s = FedKSeedStrategy(cfg, RunDir(tmp_path / "run"))
    manager = Manager(["0", "1"])
    contexts = {c: node_context(int(c), 2) for c in ("0", "1")}
    params = run_rounds(s, cfg, manager, 3, contexts)
    assert s.server.version == 3

    # round 4 for node 0: the server knows it holds version 2 -> sends only round 3's delta
    (_, ins), = s.configure_fit(4, params, Manager(["0"]))
    assert ins.config[wf.KEY_BASE] == 2 and ins.config[wf.KEY_DELTA] in ("sparse", "dense")
    delta_bytes = parameters_nbytes(ins.parameters)
    client = cf.FedKSeedClient(cfg, 0, 2, context=contexts["0"])
    zm, _, metrics = client.rebuild(parameters_to_ndarrays(ins.parameters), ins.config)
    assert metrics["zo_full_rebuild"] == 0.0
    cached = params_copy(cfg)

    # a fresh process that the server does not know: the full vector from x0
    cf.clear_model_cache()
    (_, full), = s.configure_fit(4, params, Manager(["fresh"]))
    assert full.config[wf.KEY_BASE] == 0 and full.config[wf.KEY_VERSION] == 3
    assert parameters_nbytes(full.parameters) >= delta_bytes
    fresh_client = cf.FedKSeedClient(cfg, 1, 2, context=node_context(1, 2))
    _, _, fmetrics = fresh_client.rebuild(parameters_to_ndarrays(full.parameters), full.config)
    assert fmetrics["zo_full_rebuild"] == 1.0
    fresh = params_copy(cfg)
    # the caching client's weights also carry the float32 rounding residue of its own
    # +eps/-2eps/+eps perturbation round trips (<= ~1.5 ulp per local step, here 3 rounds x
    # 5 steps: ~1e-6 on weights near 1); the model updates themselves are ~1e-3
    for a, b in zip(cached, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-6)
    # the fresh client equals the server's own copy of the global model (no perturbations)
    s.zmodel.move_to(s.server.coeffs)
    for a, p in zip(fresh, s.zmodel.params):
        torch.testing.assert_close(a, p.detach(), rtol=0, atol=1e-6)
    assert max((a - b).abs().max().item() for a, b in
               zip(fresh, zo_params_x0(cfg))) > 1e-4  # the model did move


def zo_params_x0(cfg):
    from fatellm_flwr.models import load_base_model

    return [p.detach() for _, p in zo.zo_parameters(load_base_model(cfg.model),
                                                    cfg.zo_exclude_embeddings)]


def test_fresh_process_uses_node_state_and_lost_state_asks_for_full(
        tiny_model_dir, tiny_classification_file, tmp_path):
    cfg = make_cfg(tiny_model_dir("llama"), tiny_classification_file, tmp_path)
    s = FedKSeedStrategy(cfg, RunDir(tmp_path / "run"))
    manager = Manager(["0", "1"])
    contexts = {c: node_context(int(c), 2) for c in ("0", "1")}
    params = run_rounds(s, cfg, manager, 2, contexts)
    s.zmodel.move_to(s.server.coeffs)

    # deployment: a new process per message, the node's context.state survives
    cf.clear_model_cache()
    (_, ins), = s.configure_fit(3, params, Manager(["0"]))
    assert ins.config[wf.KEY_BASE] == 1
    client = cf.FedKSeedClient(cfg, 0, 2, context=contexts["0"])
    zm, _, m = client.rebuild(parameters_to_ndarrays(ins.parameters), ins.config)
    for a, p in zip(zm.params, s.zmodel.params):
        torch.testing.assert_close(a.detach(), p.detach(), rtol=0, atol=1e-6)

    # the server never heard back from node 0 in that round: it sends the same difference
    # again, and node 0, already at that version, uses what it holds.
    # Node 1 lost its state: it asks for the full vector and is left out of the round.
    cf.clear_model_cache()
    instructions = s.configure_fit(3, params, manager)
    results = []
    for proxy, i in instructions:
        ctx = node_context(1, 2) if proxy.cid == "1" else contexts["0"]
        arrays, n, m = cf.FedKSeedClient(cfg, int(proxy.cid), 2, context=ctx).fit(
            parameters_to_ndarrays(i.parameters), i.config)
        results.append((proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n,
                                      m)))
    assert results[1][1].metrics[wf.METRIC_NEED_FULL] == 1.0
    assert results[1][1].parameters.tensors == []
    s.aggregate_fit(3, results, [])
    assert s._pending[3]["clients_ok"] == 1 and s._pending[3]["clients_need_full"] == 1
    nxt = {p.cid: i for p, i in s.configure_fit(4, params, manager)}
    assert nxt["1"].config[wf.KEY_BASE] == 0 and nxt["0"].config[wf.KEY_BASE] == 2
    assert nxt["0"].config[wf.KEY_VERSION] == 3


def test_evaluate_moves_nodes_to_the_new_version(tiny_model_dir, tiny_classification_file,
                                                 tmp_path):
    cfg = make_cfg(tiny_model_dir("llama"), tiny_classification_file, tmp_path,
                   **{"fraction-evaluate": 1.0, "val-fraction": 0.2})
    s = FedKSeedStrategy(cfg, RunDir(tmp_path / "run"))
    manager = Manager(["0", "1"])
    contexts = {c: node_context(int(c), 2) for c in ("0", "1")}
    params = run_rounds(s, cfg, manager, 1, contexts)
    results = []
    for proxy, ins in s.configure_evaluate(1, params, manager):
        assert ins.config[wf.KEY_VERSION] == 1
        loss, n, m = cf.FedKSeedClient(cfg, int(proxy.cid), 2, context=contexts[proxy.cid]) \
            .evaluate(parameters_to_ndarrays(ins.parameters), ins.config)
        assert np.isfinite(loss) and n > 0
        results.append((proxy, EvaluateRes(Status(Code.OK, ""), loss, n, m)))
    s.aggregate_evaluate(1, results, [])
    for _, ins in s.configure_fit(2, params, manager):  # nothing changed since: probs only
        assert ins.config[wf.KEY_BASE] == 1 and ins.config[wf.KEY_DELTA] == "none"
        assert len(ins.parameters.tensors) == 1


def test_zo_model_undoes_local_steps_exactly_with_weight_decay(tiny_model_dir):
    from fatellm_flwr.models import load_base_model

    model = load_base_model(str(tiny_model_dir("llama")))
    seeds = zo.candidate_seeds(8, 3)
    zm = cf.ZoModel(model, seeds, exclude_embeddings=True)
    x0 = [p.detach().clone() for p in zm.params]
    target = np.zeros(8)
    target[[1, 5]] = [2e-3, -1e-3]
    zm.move_to(target)
    at_target = [p.detach().clone() for p in zm.params]
    ids = torch.randint(4, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    kept_idx, kept_g = [], []
    for i in [0, 5, 5, 7]:
        g = zo.zo_step(zm.params, lambda: model(input_ids=ids, labels=ids).loss,
                       int(seeds[i]), eps=1e-3, lr=1e-2, weight_decay=0.5)
        kept_idx.append(i)
        kept_g.append(g)
    zm.record_steps(kept_idx, kept_g, lr=1e-2, weight_decay=0.5)
    assert max((p - q).abs().max().item() for p, q in zip(zm.params, at_target)) > 1e-4
    zm.move_to(target)  # undo the local trajectory, decay included
    for p, q in zip(zm.params, at_target):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-6)
    zm.move_to(np.zeros(8))
    for p, q in zip(zm.params, x0):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-6)


def test_probability_round_trip_is_close_to_exact():
    rng = np.random.default_rng(0)
    hist = zo.SeedHistory(256, bias_loss_clip=3.0)
    hist.update(rng.integers(0, 256, 500), rng.normal(scale=2.0, size=500))
    q = wf.encode_probabilities(hist)
    assert q.dtype == np.uint8 and q.min() == 0 and q.max() == 255
    exact = hist.probabilities()
    approx = wf.decode_probabilities(q, 256)
    np.testing.assert_allclose(approx, exact, rtol=np.exp(1 / 255) - 1)
    assert wf.encode_probabilities(zo.SeedHistory(256)) is None  # uniform: nothing to send
    np.testing.assert_allclose(wf.decode_probabilities(None, 4), 0.25)
