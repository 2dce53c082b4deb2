"""FedKSeed end to end in Flower's simulation engine: 3 clients x 3 rounds, tiny model."""

import json

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from fatellm_flwr.outputs import COEFFS_FILE, ZO_COEFFICIENTS

STEPS = 20


def test_fedkseed_simulation_loss_goes_down_and_bytes_stay_tiny(
        run_flwr, tiny_model_dir, tiny_classification_file, tmp_path):
    model = tiny_model_dir("llama")
    out = tmp_path / "out"
    log = run_flwr({"algorithm": "fedkseed", "model": str(model),
                    "dataset": str(tiny_classification_file), "test-size": 15,
                    "max-examples": 0, "partitioner": "iid", "num-server-rounds": 3,
                    "local-steps": STEPS, "batch-size": 4, "max-length": 64,
                    "zo-lr": 1e-3, "zo-eps": 1e-3, "zo-num-seeds": 4096,
                    "min-fit-clients": 3, "min-available-clients": 3,
                    "output-dir": str(out), "run-name": "fk",
                    "server-val-size": 10, "best-metric": "server_val_loss"})
    assert "FedKSeed: K=4096 seeds" in log
    run = out / "fk"
    records = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    losses = [r["server_loss"] for r in records]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.05, losses
    for r in records[1:]:
        assert r["clients_ok"] == 3 and r["clients_failed"] == 0
        assert r["clients_need_full"] == 0  # node state survived between rounds
        # up: (int32 index + float32 g) per step + two .npy headers; independent of K
        assert r["bytes_up_per_client"] == 8 * STEPS + 256
        assert r["bytes_down_per_client"] < 18 * 1024 - r["bytes_up_per_client"]
        assert r["up_pct_of_full_model"] < 1.0
    assert records[1]["bytes_down_per_client"] == 0  # round 1: x0 and uniform sampling
    assert records[3]["fit_zo_full_rebuild"] == 0  # round 3: only round 2's difference
    assert json.loads((run / "checkpoint.json").read_text())["round"] == 3
    # best/ (by the server's validation loss): the round's coefficients, a few KB
    chosen = min(records, key=lambda r: r["server_val_loss"])["round"]
    manifest = json.loads((run / "best" / "fatellm-model.json").read_text())
    assert manifest["round"] == chosen == records[-1]["best_round"]
    assert manifest["format"] == ZO_COEFFICIENTS and (run / "best" / COEFFS_FILE).exists()
    # the full model was saved and loads with plain transformers
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    x0 = AutoModelForCausalLM.from_pretrained(model)
    moved = [not torch.equal(a, b) for a, b in zip(final.parameters(), x0.parameters())]
    assert any(moved)
    assert np.isfinite(final(torch.tensor([[4, 5, 6]])).logits.detach().numpy()).all()
