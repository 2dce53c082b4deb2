"""The InferDPT notebook runs top to bottom (tiny models) and shows a private query."""

import re


def test_inferdpt_notebook_runs(execute_notebook):
    _, text = execute_notebook("inferdpt.ipynb", timeout=300)
    assert "neighbours; drawn" in text
    kept = [int(x) for x in re.findall(r"eps +[0-9.]+: (\d+)% tokens unchanged", text)]
    assert len(kept) == 4 and kept[0] <= kept[-1]
    assert "remote saw:" in text and "final answer:" in text and "non-private answer:" in text
