"""Flower's SecAgg+ workflow end to end: the aggregate equals plain FedAvg, dropouts survive."""

import json

import numpy as np
from safetensors.numpy import load_file


def _cfg(model, data, out, name, **extra):
    return {"model": str(model), "dataset": str(data), "test-size": 15, "max-examples": 0,
            "num-server-rounds": 1, "local-steps": 2, "batch-size": 4, "lr": 5e-3,
            "max-length": 48, "output-dir": str(out), "run-name": name, "partitioner": "iid",
            "min-available-clients": 3, "min-fit-clients": 3, "server-eval": False,
            "plots": False, "secagg-max-weight": 100.0, **extra}


def _max_abs_diff(a, b):
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(
        str(b / "adapter_model.safetensors"))
    return max(float(np.max(np.abs(x[k] - y[k]))) for k in x)


def _record(run, rnd):
    return next(r for r in json.loads((run / "metrics.json").read_text()) if r["round"] == rnd)


def test_secagg_matches_fedavg_and_survives_a_dropout(run_flwr, tiny_model_dir,
                                                     tiny_classification_file, tmp_path):
    model, data, out = tiny_model_dir("llama"), tiny_classification_file, tmp_path / "out"
    for name, extra in {
        "plain": {},
        "secagg": {"secure-aggregation": True},
        "plain-drop": {"fail-partitions": "2"},
        "secagg-drop": {"secure-aggregation": True, "fail-partitions": "2"},
    }.items():
        log = run_flwr(_cfg(model, data, out, name, **extra))
        if name.startswith("secagg"):
            assert "Secure aggregation: SecAgg+" in log
    err = _max_abs_diff(out / "plain" / "round-001", out / "secagg" / "round-001")
    print(f"SecAgg+ vs FedAvg max abs error: {err:.3e}")
    assert err < 1e-4
    plain, secagg = _record(out / "plain", 1), _record(out / "secagg", 1)
    assert plain["distinct_updates_seen"] == 3  # plain FedAvg sees every client's update
    assert secagg["distinct_updates_seen"] == 1  # SecAgg+: the strategy only sees the sum
    assert secagg["clients_ok"] == 3
    # partition 2 drops out mid-round: the round completes with the others' aggregate
    drop = _record(out / "secagg-drop", 1)
    assert drop["clients_ok"] == 2 and drop["distinct_updates_seen"] == 1
    err_drop = _max_abs_diff(out / "plain-drop" / "round-001",
                             out / "secagg-drop" / "round-001")
    print(f"SecAgg+ with a dropout vs FedAvg of the survivors: {err_drop:.3e}")
    assert err_drop < 1e-4
    # and it differs from the 3-client aggregate, i.e. the dropped update is really gone
    assert _max_abs_diff(out / "secagg" / "round-001", out / "secagg-drop" / "round-001") > 1e-4
    # the failed client counts once, as under plain FedAvg (Flower records it twice)
    assert drop["clients_failed"] == 1 == _record(out / "plain-drop", 1)["clients_failed"]
    # the global state keeps its dtype: SecAgg+'s float64 sum does not double what is saved
    saved = load_file(str(out / "secagg" / "round-001" / "adapter_model.safetensors"))
    assert {str(v.dtype) for v in saved.values()} == {"float32"}
    with np.load(out / "secagg" / "state.npz") as z:
        assert {str(z[k].dtype) for k in z.files if k.startswith("global_")} == {"float32"}
    # the ledger counts what was sent: the same download, and each client's masked vector
    # (SecAgg+ sends integers mod 2^32 as int64, more than the float32 update)
    assert secagg["bytes_down_per_client"] == plain["bytes_down_per_client"]
    assert secagg["bytes_up_per_client"] > 1.5 * plain["bytes_up_per_client"]


def test_secagg_weight_above_max_weight_fails_clearly(run_flwr, tiny_model_dir,
                                                     tiny_classification_file, tmp_path):
    out = tmp_path / "out"
    log = run_flwr(_cfg(tiny_model_dir("llama"), tiny_classification_file, out, "heavy",
                        **{"secure-aggregation": True, "secagg-max-weight": 5.0}))
    assert "secagg-max-weight=5 is below this client's weight" in log
    records = json.loads((out / "heavy" / "metrics.json").read_text())
    assert all(r.get("clients_ok", 0) == 0 for r in records)  # nothing silently mis-weighted
