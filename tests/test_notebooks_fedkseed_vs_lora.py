"""The FedKSeed-vs-LoRA notebook runs the benchmark (tiny model) and plots both curves."""


def test_fedkseed_vs_lora_notebook_plots_both_curves(execute_notebook):
    nb, text = execute_notebook("fedkseed_vs_lora.ipynb", timeout=900)
    assert "by client compute seconds:" in text and "by forward passes per client:" in text
    images = [o for c in nb.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 1
    table = next(o["data"]["text/plain"] for c in nb.cells for o in c.get("outputs", [])
                 if "server test loss" in o.get("data", {}).get("text/plain", ""))
    assert "lora" in table and "fedkseed" in table
