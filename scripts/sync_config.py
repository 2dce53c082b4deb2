"""Keep pyproject.toml's [tool.flwr.app.config] and README's key table in step with Config.

`flwr run --run-config` only accepts keys listed in pyproject.toml, so every Config field
must be there. Missing keys are appended with their defaults (existing values are kept,
stale keys removed); the README table between `<!-- config-table -->` and the next
heading is regenerated. Run: `python scripts/sync_config.py`.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from fatellm_flwr.config import Config, config_table_markdown

ROOT = Path(__file__).resolve().parents[1]


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def sync_pyproject() -> None:
    path = ROOT / "pyproject.toml"
    text = path.read_text()
    current = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    defaults = Config().to_run_config()
    lines = ["[tool.flwr.app.config]"]
    lines += [f"{k} = {_toml(current.get(k, v))}" for k, v in defaults.items()]
    start = text.index("[tool.flwr.app.config]")
    end = text.index("\n[", start + 1)
    path.write_text(text[:start] + "\n".join(lines) + "\n" + text[end:])


def sync_readme() -> None:
    path = ROOT / "README.md"
    text = path.read_text()
    marker = "<!-- config-table -->"
    start = text.index(marker) + len(marker)
    nxt = re.search(r"\n#+ ", text[start:])
    end = start + nxt.start() if nxt else len(text)
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    path.write_text(text[:start] + "\n" + config_table_markdown(app) + "\n" + text[end:])


if __name__ == "__main__":
    sync_pyproject()
    sync_readme()
