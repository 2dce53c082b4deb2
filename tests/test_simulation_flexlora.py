"""FlexLoRA end to end in Flower's simulation engine: 3 clients at LoRA ranks 4, 8, 16."""

import json

import numpy as np


def test_flexlora_simulation(run_flwr, tiny_model_dir, tiny_classification_file, tmp_path):
    out = tmp_path / "out"
    run_flwr({"algorithm": "homo", "model": str(tiny_model_dir("llama")),
              "dataset": str(tiny_classification_file), "lora-ranks": "4,8,16",
              "test-size": 15, "num-server-rounds": 2, "local-steps": 3, "batch-size": 4,
              "lr": 5e-3, "max-length": 48, "output-dir": str(out), "run-name": "r",
              "min-available-clients": 3, "min-fit-clients": 3, "partitioner": "iid",
              "fraction-evaluate": 1.0, "plots": False})
    run = out / "r"
    records = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert r["clients_ok"] == 3 and r["clients_failed"] == 0
        assert np.isfinite(r["server_loss"]) and np.isfinite(r["eval_loss"])
    assert records[2]["server_loss"] != records[0]["server_loss"]
    # round 1: every node gets the rank-16 global state; round 2: its own rank (4/8/16)
    r1, r2 = records[1], records[2]
    assert r2["bytes_down_per_client"] < 0.8 * r1["bytes_down_per_client"]
    assert r2["bytes_up_per_client"] == r1["bytes_up_per_client"]
    final = json.loads((run / "final" / "adapter_config.json").read_text())
    assert final["r"] == 16
