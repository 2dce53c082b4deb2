"""FedMKT's strategy driven in-process with real clients (no Ray): the protocol, NaN/Inf
rejection with a logged reason, byte accounting, teacher selection, saved adapters."""

import json
import logging

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters

from fatellm_flwr.clients.fedmkt import FedMKTClient
from fatellm_flwr.config import Config
from fatellm_flwr.outputs import RunDir
from fatellm_flwr.strategies.fedmkt import FedMKTStrategy
from fatellm_flwr.testing import FakeClientManager, build_tiny_model
from fatellm_flwr.wire.common import decode_arrays
from fatellm_flwr.wire.fedmkt import KEY_SAVE_DIR, KEY_TEACHER, decode_topk

K, PUBLIC = 4, 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_classification_file):
    tmp = tmp_path_factory.mktemp("fedmkt")
    llm = build_tiny_model("llama", tmp / "llm", num_layers=2, seed=1)
    sp = build_tiny_model("gpt2", tmp / "gpt2-sp", num_layers=2, tokenizer="sentencepiece")
    bpe = build_tiny_model("qwen2", tmp / "qwen2", num_layers=2)
    cfg = Config.from_run_config({
        "algorithm": "fedmkt", "model": str(llm), "slm-models": f"{sp},{bpe}",
        "dataset": str(tiny_classification_file), "test-size": 20, "fedmkt-public-size": PUBLIC,
        "fedmkt-top-k": K, "fedmkt-lambda": 0.5, "num-server-rounds": 2, "local-steps": 2,
        "batch-size": 4, "max-length": 40, "partitioner": "iid", "plots": False,
        "output-dir": str(tmp / "out"), "run-name": "r", "val-fraction": 0.2})
    return cfg, str(sp), str(bpe)


def fit_res(arrays, n, metrics):
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, metrics)


def test_round_trip(setup, caplog):
    cfg, sp, bpe = setup
    run = RunDir.create(cfg.output_dir, cfg.run_name, "fedmkt")
    strategy = FedMKTStrategy(cfg, run)
    contexts = [Context(run_id=1, node_id=i, node_config={}, state=RecordDict(),
                        run_config={}) for i in range(2)]
    manager = FakeClientManager(2)
    params = strategy.initialize_parameters(manager)
    strategy.evaluate(0, params)
    for rnd in (1, 2):
        fit_ins = strategy.configure_fit(rnd, params, manager)
        assert all(len(ins.parameters.tensors) == 0 for _, ins in fit_ins)  # no weights down
        results = []
        for proxy, ins in fit_ins:
            pid = int(proxy.cid)
            client = FedMKTClient(cfg, pid, 2, context=contexts[pid])
            arrays, n, metrics = client.fit([], ins.config)
            assert metrics["fedmkt-slm"] == [sp, bpe][pid]
            results.append((proxy, fit_res(arrays, n, metrics)))
        # a third reply with a NaN logit is dropped with its reason
        bad = [a.copy() for a in decode_arrays(results[0][1].parameters)]
        bad[0][0, 0] = np.nan
        extra = FakeClientManager(["99"]).proxies[0]
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            new, _ = strategy.aggregate_fit(rnd, results + [
                (extra, fit_res(bad, 5, results[0][1].metrics))], [])
        assert "dropping client 99" in caplog.text and "NaN" in caplog.text
        assert new is not None
        rec = strategy._pending[rnd]
        assert rec["clients_ok"] == 2 and rec["clients_failed"] == 1
        assert rec["llm_distill_steps"] > 0 and rec["llm_distill_kd_positions"] > 0
        strategy.evaluate(rnd, new)
        eval_ins = strategy.configure_evaluate(rnd, new, manager)
        assert [p.cid for p, _ in eval_ins] == ["0", "1"]
        eval_res = []
        for proxy, ins in eval_ins:
            pid = int(proxy.cid)
            assert ins.config[KEY_TEACHER] and (KEY_SAVE_DIR in ins.config) == (rnd == 2)
            down = decode_arrays(ins.parameters)
            topk, _ = decode_topk(down)
            client = FedMKTClient(cfg, pid, 2, context=contexts[pid])
            assert [len(v) for v, _ in topk] == [len(e["input_ids"]) for e in client.public]
            assert all(np.isfinite(v).all() for v, _ in topk)
            assert all(((i >= -1) & (i < len(client.tokenizer))).all() for _, i in topk)
            loss, n, m = client.evaluate(down, ins.config)
            assert m["slm_distill_steps"] > 0 and np.isfinite(loss)
            eval_res.append((proxy, EvaluateRes(Status(Code.OK, ""), loss, n, m)))
        strategy.aggregate_evaluate(rnd, eval_res, [])
        params = new
    records = {r["round"]: r for r in run.records}
    for rnd in (1, 2):
        r = records[rnd]
        up = r["bytes_up_per_client"]  # 2 good + 1 bad client, all counted
        assert r["bytes_down"] > 0 and 0 < up < 8 * K * PUBLIC * 40 + 1024
        assert "eval_slm_accuracy" in r and np.isfinite(r["server_loss"])
    # the node remembers its SLM adapter between rounds (context.state), and saved it
    assert "fatellm.fedmkt-slm-adapter" in contexts[0].state.array_records
    strategy.finish()
    for pid in (0, 1):
        assert (run.path / f"slm-partition-{pid}" / "adapter_config.json").exists()
    assert json.loads((run.path / "final" / "fatellm-model.json").read_text())[
        "algorithm"] == "fedmkt"


def test_unknown_slm_and_wrong_lengths_are_dropped(setup, caplog):
    cfg, sp, _ = setup
    run = RunDir.create(cfg.output_dir, "r2", "fedmkt")
    strategy = FedMKTStrategy(cfg, run)
    proxy = FakeClientManager(1).proxies[0]
    strategy.configure_fit(1, strategy.initialize_parameters(None), FakeClientManager(1))
    arrays = [np.zeros((3, K), np.float32), np.zeros((3, K), np.int32),
              np.array([3], np.int32), np.zeros(1, np.float32)]
    with caplog.at_level(logging.WARNING):
        out, _ = strategy.aggregate_fit(1, [
            (proxy, fit_res(arrays, 1, {"fedmkt-slm": sp, "fedmkt-slm-vocab": 10 ** 6})),
            (proxy, fit_res(arrays, 1, {"partition-id": 0}))], [])
    assert out is None
    assert "vocabulary of 1000000" in caplog.text and "naming its SLM" in caplog.text
