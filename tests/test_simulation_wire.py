"""`wire-dtype=float16` end to end: the same homo run with float32 and float16 on the wire;
bytes down and up per client halve (up to .npy headers), the run trains and evaluates.

The float32 run is the session's CLI homo run (``cli_runs``, float32 by default); the
float16 run repeats its exact config with only ``wire-dtype`` changed."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file


@pytest.mark.parametrize("algorithm", ["homo"])
def test_float16_wire_halves_bytes_both_ways(run_flwr, cli_runs, cli_run_configs, tmp_path,
                                             algorithm):
    out = tmp_path / "out"
    cfg = cli_run_configs[algorithm]
    assert cfg["algorithm"] == algorithm and cfg.get("wire-dtype", "float32") == "float32"
    run_flwr({**cfg, "wire-dtype": "float16", "output-dir": str(out), "run-name": "float16"},
             num_supernodes=cfg["min-available-clients"])  # as many as cli_runs had
    records = {"float32": json.loads((cli_runs[algorithm] / "metrics.json").read_text()),
               "float16": json.loads((out / "float16" / "metrics.json").read_text())}
    assert len(records["float16"]) == len(records["float32"]) == 3  # rounds 0, 1, 2
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
