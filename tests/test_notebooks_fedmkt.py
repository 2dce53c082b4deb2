"""notebooks/fedmkt.ipynb runs top to bottom with tiny models (FATELLM_NOTEBOOK_TINY=1)."""

import time


def test_fedmkt_notebook_runs(execute_notebook):
    t0 = time.perf_counter()
    nb, text = execute_notebook("fedmkt.ipynb", timeout=300)
    assert not any(out.get("output_type") == "error" for c in nb.cells
                   for out in c.get("outputs", []))
    assert "vocabularies: LLM 300, SLM 87" in text
    for column in ("LLM accuracy", "SLM val accuracy (mean)", "bytes up / client"):
        assert column in text
    assert "saved adapters: ['final', 'slm-partition-0', 'slm-partition-1', 'slm-partition-2']" \
        in text
    assert "fedmkt notebook: OK" in text
    print(f"notebook executed in {time.perf_counter() - t0:.1f}s")
