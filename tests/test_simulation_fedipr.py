"""FedIPR end to end in the simulation engine, with DP-SGD and SecAgg+ switched on: each
client's signature is detected in the final global adapter, a never-seen one is not."""

import json

import numpy as np

from fatellm_flwr.privacy import fedipr as F


def test_fedipr_with_dp_sgd_and_secagg(run_flwr, tiny_model_dir, tiny_classification_file,
                                       tmp_path):
    out, keys = tmp_path / "out", tmp_path / "keys"
    log = run_flwr({
        "model": str(tiny_model_dir("llama")), "dataset": str(tiny_classification_file),
        "test-size": 15, "num-server-rounds": 4, "local-steps": 3, "batch-size": 4,
        "lr": 5e-3, "max-length": 48, "output-dir": str(out), "run-name": "ipr",
        "partitioner": "iid", "min-available-clients": 3, "min-fit-clients": 3,
        "plots": False, "lora-dropout": 0.0, "fraction-evaluate": 1.0,
        "fedipr": True, "fedipr-bits": 16, "fedipr-secret-dir": str(keys),
        "dp-sgd": True, "dp-noise-multiplier": 1.0,
        "secure-aggregation": True, "secagg-max-weight": 100.0})
    assert "Secure aggregation: SecAgg+" in log
    records = json.loads((out / "ipr" / "metrics.json").read_text())
    rounds = [r for r in records if r["round"] > 0]
    assert [r["clients_ok"] for r in rounds] == [3, 3, 3, 3]
    assert all(r["distinct_updates_seen"] == 1 for r in rounds)  # SecAgg+: only the sum
    assert all(r["fit_dp_epsilon"] > 0 for r in rounds)
    # every client reported its own detection rate on each round's global model
    for p in range(3):
        assert all(f"fit_fedipr_detection_global_p{p}" in r for r in rounds)
        assert all(f"eval_fedipr_detection_p{p}" in r for r in rounds)
    final = rounds[-1]
    print({k: v for k, v in final.items() if "fedipr" in k})
    # the owners prove ownership of the saved final adapter with their own secrets
    secrets = [F.Secret.load(keys / f"fedipr-secret-{p}.json") for p in range(3)]
    assert len({s.key for s in secrets}) == 3
    rates = [F.verify(out / "ipr" / "final", s).detection for s in secrets]
    print("owner detection", rates)
    # DP noise is unseeded (secure), so detection varies run to run: every owner must be
    # clearly above chance (12 of 16 bits: binomial p-value 0.038), the owners on average 0.8
    assert min(rates) >= 0.75 and np.mean(rates) >= 0.8
    assert final["eval_fedipr_detection"] >= 0.75
    # secrets the federation never saw: chance level
    others = [F.verify(out / "ipr" / "final", F.generate_secret(
        secrets[0].carriers, secrets[0].sizes, 16)).detection for _ in range(30)]
    print("non-owner detection", np.mean(others))
    assert abs(np.mean(others) - 0.5) < 0.15
