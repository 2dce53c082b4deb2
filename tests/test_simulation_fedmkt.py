"""FedMKT end to end in Flower's simulation engine: a tiny Llama LLM (byte-level BPE) on the
server, clients' SLMs of two other families and two tokenizers (GPT-2 with a
sentencepiece-style Unigram, Qwen2 with byte-level BPE), 3 clients x 2 rounds."""

import json

import numpy as np

from fatellm_flwr.testing import build_tiny_model


def test_fedmkt_simulation(run_flwr, tiny_classification_file, tmp_path):
    llm = build_tiny_model("llama", tmp_path / "llm", num_layers=2, seed=1)
    slm_sp = build_tiny_model("gpt2", tmp_path / "slm-gpt2-sp", num_layers=2,
                              tokenizer="sentencepiece")
    slm_bpe = build_tiny_model("qwen2", tmp_path / "slm-qwen2", num_layers=2)
    out = tmp_path / "out"
    k, public = 4, 10
    text = run_flwr({"algorithm": "fedmkt", "model": str(llm),
                     "slm-models": f"{slm_sp},{slm_bpe},{slm_sp}",
                     "dataset": str(tiny_classification_file), "test-size": 30,
                     "fedmkt-public-size": public, "fedmkt-top-k": k, "fedmkt-lambda": 0.5,
                     "fedmkt-selection": "weighted-mean", "num-server-rounds": 2,
                     "local-steps": 2, "batch-size": 4, "lr": 5e-3, "max-length": 48,
                     "output-dir": str(out), "run-name": "r", "min-available-clients": 3,
                     "min-fit-clients": 3, "partitioner": "iid", "plots": False,
                     "val-fraction": 0.2})
    assert "dropping client" not in text
    assert "SLM distillation/evaluation failed" not in text, text[-6000:]
    run = out / "r"
    records = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[0]["fedmkt_public_examples"] == public
    for r in records:
        assert np.isfinite(r["server_loss"]) and 0 <= r["server_accuracy"] <= 1
    for r in records[1:]:
        assert r["clients_ok"] == 3 and r["clients_failed"] == 0
        assert r["llm_distill_steps"] > 0 and r["llm_distill_skipped_steps"] == 0
        assert r["llm_distill_kd_positions"] > 0 and np.isfinite(r["llm_distill_kd_loss"])
        assert 0 < r["fedmkt_aligned_fraction"] <= 1
        assert r["fedmkt_examples_taught"] == public
        # SLMs distilled the LLM's logits and report validation metrics
        assert r["eval_slm_distill_steps"] > 0 and np.isfinite(r["eval_slm_distill_kd_loss"])
        assert 0 <= r["eval_slm_accuracy"] <= 1 and np.isfinite(r["eval_loss"])
        # only logits travel: values + ids (8 bytes x k per public token) + lengths + CE
        assert 0 < r["bytes_up_per_client"] < 8 * k * public * 48 + 4 * 1024
        assert 0 < r["bytes_down_per_client"] < 8 * k * public * 48 + 4 * 1024
    assert records[2]["server_loss"] != records[0]["server_loss"]
    # the final LLM adapter and every client's SLM adapter are saved
    assert (run / "final" / "adapter_config.json").exists()
    for pid in range(3):
        folder = run / f"slm-partition-{pid}"
        assert (folder / "adapter_config.json").exists(), folder
        manifest = json.loads((folder / "fatellm-model.json").read_text())
        assert manifest["algorithm"] == "fedmkt"
    cfg = json.loads((run / "slm-partition-1" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(slm_bpe)
