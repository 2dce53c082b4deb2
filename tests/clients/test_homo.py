import numpy as np
import pytest

from fatellm_flwr.clients.homo import HomoClient
from fatellm_flwr.config import Config
from fatellm_flwr.models import clear_model_cache


def test_fit_returns_trained_adapter_and_counts(tiny_model_dir, tiny_classification_file):
    cfg = Config.from_run_config({"model": str(tiny_model_dir("llama")),
                                  "dataset": str(tiny_classification_file), "test-size": 12,
                                  "max-examples": 0, "local-steps": 2, "lr": 1e-2,
                                  "max-length": 64, "partitioner": "iid",
                                  "proximal-mu": 0.1})
    client = HomoClient(cfg, partition_id=1, num_partitions=3)
    start = client.get_parameters({})
    new, n, metrics = client.fit(start, {"server-round": 1})
    assert [a.shape for a in new] == [a.shape for a in start]
    assert any(not np.array_equal(a, b) for a, b in zip(new, start))
    assert n == len(client.train) and metrics["partition-id"] == 1
    assert metrics["local_steps"] == 2 and np.isfinite(metrics["train_loss"])
    loss, n_val, ev = client.evaluate(new, {})
    assert n_val == len(client.val) > 0 and np.isfinite(loss) and 0 <= ev["accuracy"] <= 1


@pytest.mark.slow
def test_embedded_default_model_and_data_for_real():
    """The README's main job ingredients: SmolLM2-135M-Instruct + BBC News, loaded for real."""
    clear_model_cache()
    cfg = Config.from_run_config({"max-examples": 60, "test-size": 10, "local-steps": 1,
                                  "batch-size": 2, "max-length": 96, "eval-batch-size": 5})
    client = HomoClient(cfg, partition_id=0, num_partitions=2)
    assert client.task_data.label_names == ("business", "entertainment", "politics", "sport",
                                            "tech")
    start = client.get_parameters({})
    assert sum(a.size for a in start) > 1_000_000  # LoRA r8 on all 7 linear kinds x 30 blocks
    new, n, metrics = client.fit(start, {"server-round": 1})
    assert np.isfinite(metrics["train_loss"]) and n > 0
    loss, _, ev = client.evaluate(new, {})
    assert np.isfinite(loss) and 0.0 <= ev["accuracy"] <= 1.0
    clear_model_cache()
