"""The DP-settings notebook runs top to bottom (tiny model) and reports every arm."""

import re


def test_dp_settings_notebook_reports_every_arm(execute_notebook):
    _, text = execute_notebook("dp_settings.ipynb", timeout=900)
    found = dict(re.findall(r"^(no-dp|eps-8|eps-3|eps-1|client-dp): accuracy .*?epsilon "
                            r"(\S+),", text, flags=re.M))
    assert set(found) == {"no-dp", "eps-8", "eps-3", "eps-1", "client-dp"}, text[-2000:]
    assert found["no-dp"] == "None"
    spent = {k: float(v) for k, v in found.items() if k != "no-dp"}
    for name, target in (("eps-8", 8), ("eps-3", 3), ("eps-1", 1)):
        assert 0 < spent[name] <= target * 1.001
    assert spent["eps-1"] < spent["eps-3"] < spent["eps-8"]
    assert spent["client-dp"] > 0
    assert "| gain / no-DP gain |" in text
