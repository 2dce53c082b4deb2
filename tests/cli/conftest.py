"""Runs produced once per test session (tiny models, Flower simulation) for the CLI tests."""

from __future__ import annotations

import pytest

from fatellm_flwr.testing import build_tiny_model

COMMON = {"test-size": 15, "max-examples": 0, "partitioner": "iid", "batch-size": 4,
          "max-length": 48, "min-fit-clients": 2, "min-available-clients": 2, "plots": False}


@pytest.fixture(scope="session")
def cli_runs(run_flwr, tiny_model_dir, tiny_classification_file, tmp_path_factory):
    """``{algorithm: run folder}``: homo (LoRA, tracker=tensorboard), fedkseed and offsite,
    each a real `flwr run` of 2 rounds on 2 simulated SuperNodes."""
    out = tmp_path_factory.mktemp("cli-runs")
    data = str(tiny_classification_file)
    llama = str(tiny_model_dir("llama"))
    deep = str(build_tiny_model("llama", out / "deep-llama", num_layers=6))
    configs = {
        "homo": {"algorithm": "homo", "model": llama, "local-steps": 4, "lr": 5e-3,
                 "tracker": "tensorboard"},
        "fedkseed": {"algorithm": "fedkseed", "model": llama, "local-steps": 6,
                     "zo-lr": 1e-3, "zo-eps": 1e-3, "zo-num-seeds": 64},
        "offsite": {"algorithm": "offsite", "model": deep, "local-steps": 3, "lr": 5e-3,
                    "offsite-bottom": 1, "offsite-top": 1, "offsite-emulator-layers": 2},
    }
    runs = {}
    for name, cfg in configs.items():
        run_flwr({**COMMON, **cfg, "dataset": data, "num-server-rounds": 2,
                  "output-dir": str(out / "outputs"), "run-name": name}, num_supernodes=2)
        runs[name] = out / "outputs" / name
    return runs
