"""FedHomoLLM end to end in Flower's simulation engine: 3 clients x 2 rounds, tiny model."""

import json

import numpy as np
import pytest
from peft import PeftModel
from safetensors.numpy import load_file

from fatellm_flwr.models import load_base_model


def _adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def _base_config(model, data, out, run_name, **extra):
    return {"model": str(model), "dataset": str(data), "test-size": 15, "max-examples": 0,
            "num-server-rounds": 2, "local-steps": 3, "batch-size": 4, "lr": 5e-3,
            "max-length": 64, "output-dir": str(out), "run-name": run_name,
            "fraction-evaluate": 1.0, "min-available-clients": 3, "min-fit-clients": 3,
            "partitioner": "iid", **extra}


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt-tuning", "prefix-tuning"])
def test_homo_simulation_each_peft_method(run_flwr, tiny_model_dir, tiny_classification_file,
                                          tmp_path, method):
    model = tiny_model_dir("llama")
    out = tmp_path / "out"
    run_flwr(_base_config(model, tiny_classification_file, out, method,
                          **{"peft-method": method, "num-virtual-tokens": 4}))
    run = out / method
    records = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert r["clients_ok"] == 3 and r["clients_failed"] == 0
        assert r["bytes_up"] > 0 and np.isfinite(r["server_loss"])
        assert "eval_loss" in r  # clients evaluated their validation splits
        assert 0.0 <= r["server_accuracy"] <= 1.0
    # the global adapter changes from round to round
    r1, r2 = _adapter(run / "round-001"), _adapter(run / "round-002")
    assert any(not np.array_equal(r1[k], r2[k]) for k in r1)
    assert json.loads((run / "checkpoint.json").read_text())["round"] == 2
    assert (run / "plots" / "loss.png").exists() and (run / "metrics.csv").exists()
    PeftModel.from_pretrained(load_base_model(str(model)), run / "final")


def test_homo_resume_continues_at_the_right_round(run_flwr, tiny_model_dir,
                                                 tiny_classification_file, tmp_path):
    out = tmp_path / "out"
    cfg = _base_config(tiny_model_dir("llama"), tiny_classification_file, out, "r",
                       **{"num-server-rounds": 1, "fraction-evaluate": 0.0,
                          "aggregator": "fedadam", "server-lr": 0.01})
    run_flwr(cfg)
    first = _adapter(out / "r" / "round-001")
    log = run_flwr({**cfg, "num-server-rounds": 3, "run-name": "ignored",
                    "resume-from": str(out / "r")})
    assert "Resuming homo from round 1" in log
    records = json.loads((out / "r" / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert json.loads((out / "r" / "checkpoint.json").read_text())["round"] == 3
    # round 1 is the first run's, untouched; later rounds build on it
    np.testing.assert_array_equal(_adapter(out / "r" / "round-001")["base_model.model.model."
                                  "layers.0.self_attn.q_proj.lora_A.weight"],
                                  first["base_model.model.model.layers.0.self_attn.q_proj."
                                        "lora_A.weight"])
    assert not (out / "ignored").exists()
    # and the resumed run ends where an uninterrupted 3-round run ends (FedAdam's moments
    # and bias correction continue at the run's round number, not at Flower's "round 1")
    run_flwr({**cfg, "num-server-rounds": 3, "run-name": "straight"})
    straight, resumed = _adapter(out / "straight" / "final"), _adapter(out / "r" / "final")
    assert straight.keys() == resumed.keys()
    for k in straight:
        np.testing.assert_allclose(resumed[k], straight[k], rtol=1e-4, atol=1e-6, err_msg=k)
