"""`wire-dtype=float16` end to end: the same homo run with float32 and float16 on the wire;
bytes down and up per client halve (up to .npy headers), the run trains and evaluates."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file


@pytest.mark.parametrize("algorithm", ["homo"])
def test_float16_wire_halves_bytes_both_ways(run_flwr, tiny_model_dir,
                                             tiny_classification_file, tmp_path, algorithm):
    out = tmp_path / "out"
    records = {}
    for wire in ("float32", "float16"):
        run_flwr({"model": str(tiny_model_dir("llama")), "dataset": str(tiny_classification_file),
                  "test-size": 15, "max-examples": 0, "num-server-rounds": 2, "local-steps": 2,
                  "batch-size": 4, "lr": 5e-3, "max-length": 48, "partitioner": "iid",
                  "min-fit-clients": 2, "min-available-clients": 2, "fraction-evaluate": 0.0,
                  "plots": False, "algorithm": algorithm, "wire-dtype": wire,
                  "output-dir": str(out), "run-name": wire}, num_supernodes=2)
        records[wire] = json.loads((out / wire / "metrics.json").read_text())
    for r32, r16 in zip(records["float32"][1:], records["float16"][1:]):
        assert r16["clients_ok"] == 2 and r16["clients_failed"] == 0, r16
        for key in ("bytes_down_per_client", "bytes_up_per_client"):
            # the values halve; each tensor's 128-byte .npy header does not
            headers = 2 * r16[key] - r32[key]
            assert headers > 0 and headers % 128 == 0, (key, r32[key], r16[key])
            assert r16[key] - headers == (r32[key] - headers) / 2, (key, r32[key], r16[key])
        assert np.isfinite(r16["server_loss"])
    # the global adapter is still kept (and saved) in float32 by the server
    adapter = load_file(str(out / "float16" / "final" / "adapter_model.safetensors"))
    assert {a.dtype for a in adapter.values()} == {np.dtype(np.float32)}
    # it trained: the loss moved
    assert records["float16"][2]["server_loss"] != records["float16"][0]["server_loss"]
