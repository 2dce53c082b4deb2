"""The FedHomoLLM results notebook runs top to bottom (tiny model) and shows its figures."""


def test_fedhomollm_notebook_runs(execute_notebook):
    nb, text = execute_notebook("fedhomollm.ipynb", timeout=900)
    assert "ran benchmarks/homo_quality.py --model tiny" in text
    # the three arms, read back from the results file the benchmark wrote
    for arm in ("federated LoRA", "centralized LoRA", "local-only LoRA, mean of 3 clients"):
        assert arm in text
    assert "federated - centralized:" in text and "federated - best single client:" in text
    assert "of full fine-tuning" in text and "measured by the Flower run's byte ledger" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # quality figure + communication figure
