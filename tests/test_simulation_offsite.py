"""Offsite-tuning end to end in Flower's simulation engine: 3 clients x 2 rounds, 8 blocks."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from fatellm_flwr.emulator import OffsiteSplit, blocks_prefix, decoder_blocks
from fatellm_flwr.testing import build_tiny_model

FOUR = ("full_zeroshot", "emulator_original", "emulator_tuned", "plugin")


# untied head + full adapter tuning; tied head + LoRA adapters + SecAgg+ (deltas of the
# adapters) + client-side clipping (possible since the emulator travels outside Parameters)
@pytest.mark.parametrize("arch, lora, secagg", [("llama", False, False), ("qwen2", True, True)])
def test_offsite_simulation(run_flwr, tiny_classification_file, tmp_path, arch, lora, secagg):
    dp = {"client-dp": "client-fixed", "client-dp-clip-norm": 100.0,
          "client-dp-noise-multiplier": 0.01} if secagg else {}
    # keep the best round, selected on the server's validation set (12 examples out of the
    # clients' pool) or on the clients' aggregated validation loss
    best = {"best-metric": "eval_loss"} if secagg else {"best-metric": "server_val_loss",
                                                        "server-val-size": 12}
    model = build_tiny_model(arch, tmp_path / f"deep-{arch}", num_layers=8)
    out = tmp_path / "out"
    run_flwr({"algorithm": "offsite", "model": str(model),
              "dataset": str(tiny_classification_file), "test-size": 15, "max-examples": 0,
              "num-server-rounds": 2, "local-steps": 3, "batch-size": 4, "lr": 5e-3,
              "max-length": 64, "output-dir": str(out), "run-name": "r",
              "fraction-evaluate": 1.0, "min-available-clients": 3, "min-fit-clients": 3,
              "partitioner": "iid", "offsite-bottom": 2, "offsite-top": 2,
              "offsite-emulator-layers": 2, "offsite-lora": lora, "plots": False,
              "secure-aggregation": secagg, **dp, **best})
    run = out / "r"
    records = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records:
        for what in FOUR:
            assert np.isfinite(r[f"server_{what}_loss"]), (what, r)
            assert 0.0 <= r[f"server_{what}_accuracy"] <= 1.0
        assert r["server_loss"] == r["server_plugin_loss"]
    for r in records[1:]:
        assert r["clients_ok"] == 3 and r["clients_failed"] == 0
        assert r["clients_need_emulator"] == 0 and "eval_loss" in r
        assert r["distinct_updates_seen"] == (1 if secagg else 3)
        assert r["server_full_zeroshot_loss"] == records[0]["server_full_zeroshot_loss"]
    r0, r1, r2 = records
    assert r2["server_plugin_loss"] != r0["server_plugin_loss"]
    # round 1 ships the frozen emulator once per node; round 2 only the adapters
    frozen, adapters = r0["offsite_frozen_emulator_bytes"], r0["offsite_adapter_bytes"]
    assert r1["bytes_down_per_client"] > adapters + frozen
    assert adapters <= r2["bytes_down_per_client"] < adapters + 20_000
    for r in (r1, r2):  # only the adapters come back (+ ~128-byte .npy headers); under
        # SecAgg+ as the masked int64 vector the client measured
        up = r["bytes_up_per_client"]
        assert (2 * adapters < up < 2 * adapters + 20_000) if secagg else (
            adapters < up < adapters + 20_000)
    if secagg:
        assert "client_dp_epsilon" in r2
    # the final plugged-in model: adapter blocks tuned, every middle block untouched
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    orig = AutoModelForCausalLM.from_pretrained(model)
    split = OffsiteSplit(8, 2, 2, 2)
    fb, ob = decoder_blocks(final), decoder_blocks(orig)
    for i in split.adapter_indices():
        assert any(not torch.equal(p, q) for p, q in zip(fb[i].parameters(),
                                                          ob[i].parameters())), i
    for i in split.middle_indices():  # dropped and emulator blocks alike
        assert all(torch.equal(p, q) for p, q in zip(fb[i].parameters(), ob[i].parameters()))
    prefix = blocks_prefix(final)
    outside = {n: p for n, p in orig.named_parameters() if not n.startswith(prefix)}
    final_params = dict(final.named_parameters())
    assert all(torch.equal(final_params[n], p) for n, p in outside.items())
    assert (run / "round-002" / "config.json").exists()
    metric = best["best-metric"]
    scored = [r for r in records if metric in r]
    assert len(scored) == (2 if secagg else 3)  # clients evaluate after rounds 1 and 2 only
    chosen = min(scored, key=lambda r: r[metric])["round"]
    assert all(r["best_round"] == min((q for q in scored if q["round"] <= r["round"]),
                                      key=lambda q: q[metric])["round"] for r in scored)
    manifest = json.loads((run / "best" / "fatellm-model.json").read_text())
    assert manifest["round"] == chosen and (run / "best" / "config.json").exists()
    assert json.loads((run / "checkpoint.json").read_text())["round"] == 2
