"""The FedIPR notebook runs top to bottom (tiny model) and proves ownership."""

import re


def test_fedipr_notebook_runs_and_verifies_ownership(execute_notebook):
    _, text = execute_notebook("fedipr.ipynb", timeout=600)
    assert "flwr run exit code: 0" in text
    owners = [float(x) for x in re.findall(r"client \d: detection ([0-9.]+) over", text)]
    assert len(owners) == 3 and min(owners) >= 0.75
    assert "owner=True" in text and "OWNER" in text
    mean = float(re.search(r"never-seen secrets: mean detection ([0-9.]+)", text).group(1))
    assert abs(mean - 0.5) < 0.15
    assert "after pruning 20%" in text
