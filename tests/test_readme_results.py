"""The README's measured figures come from `benchmarks/results/` (scripts/readme_results.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


rr = _load("readme_results", ROOT / "scripts" / "readme_results.py")
common = _load("_common", ROOT / "benchmarks" / "_common.py")


def test_readme_figures_are_current():
    text = (ROOT / "README.md").read_text()
    assert rr.update(text) == text, \
        "README's benchmark figures are stale: run python scripts/readme_results.py"


def test_every_results_file_in_the_block_has_a_summary():
    for _, names in rr.SECTIONS:
        for name in names:
            assert rr.summary_rows(ROOT / "benchmarks" / "results" / f"{name}.md")


def _results_dir(tmp_path: Path, summary: list[tuple[str, str]] | None) -> Path:
    for _, names in rr.SECTIONS:
        for name in names:
            body = f"# {name}\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n"
            if summary is not None:
                body += "\n".join(common.summary_block(
                    [(q, f"{r} ({name})") for q, r in summary])) + "\n"
            (tmp_path / f"{name}.md").write_text(body)
    (tmp_path / "quickstart.json").write_text(json.dumps({
        "wall_s": 408.4, "accuracy": [0.24, 0.66, 0.76, 0.9], "rounds": 3,
        "bytes_up_per_client": 9822720, "up_pct_of_full_model": 1.83,
        "load_avg": [3.5, 2.0, 1.0]}))
    return tmp_path


def test_block_is_built_from_the_summaries(tmp_path):
    results = _results_dir(tmp_path, [("how fast", "**2.0x**"), ("how big", "3 MB")])
    readme = ("# x\n\nthen <!-- quickstart-figures -->typed by hand<!-- /quickstart-figures"
              " -->.\n\n## Benchmarks\n\n<!-- benchmark-results -->\nold hand-typed rows\n\n"
              "## Configuration\nkept\n")
    out = rr.update(readme, results)
    assert "old hand-typed rows" not in out and "typed by hand" not in out
    assert "## Configuration\nkept\n" in out
    assert "| how fast | **2.0x** (homo_comm) | [homo_comm](benchmarks/results/homo_comm.md) |" \
        in out
    assert "| how big | 3 MB (homo_comm) | same |" in out
    assert "6 min 48 s" in out and "0.24 -> 0.66 -> 0.76 -> 0.90" in out
    assert "9.8 MB up per client per round (1.8% of the full model)" in out
    assert rr.update(out, results) == out  # idempotent


def test_unlisted_results_with_a_summary_get_a_section(tmp_path):
    results = _results_dir(tmp_path, [("q", "r")])
    (results / "zz_new.md").write_text("# new\n" + "\n".join(
        common.summary_block([("new question", "**1.5x**")])) + "\n")
    (results / "zz_plain.md").write_text("# no summary: not shown\n")
    block = rr.render_block(results)
    assert "**Other benchmarks**" in block
    assert "| new question | **1.5x** | [zz_new](benchmarks/results/zz_new.md) |" in block
    assert "zz_plain" not in block


def test_missing_summary_is_named(tmp_path):
    results = _results_dir(tmp_path, None)
    with pytest.raises(ValueError, match="homo_comm.md has no"):
        rr.render_block(results)


def test_check_mode_fails_on_a_stale_readme(tmp_path, monkeypatch, capsys):
    results = _results_dir(tmp_path, [("q", "r")])
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- benchmark-results -->\nstale\n")
    monkeypatch.setattr(rr, "README", readme)
    monkeypatch.setattr(rr, "RESULTS", results)
    assert rr.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert rr.main([]) == 0
    assert rr.main(["--check"]) == 0


def test_summary_cells_cannot_break_the_table():
    with pytest.raises(ValueError, match="'|'"):
        common.summary_block([("a | b", "c")])


def test_interleaved_runs_arms_in_turn_and_samples_load():
    order = []
    bench = common.Interleaved({"a": lambda rep: order.append(("a", rep)) or rep,
                                "b": lambda rep: order.append(("b", rep)) or 2 * rep + 1})
    bench.run(3, log=lambda *_: None)
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert bench.values("b") == [1, 3, 5]
    assert bench.ratios("b", "a", key=lambda r: r + 1) == [2.0, 2.0, 2.0]
    assert len(bench.loads) == 6 and "load average" in bench.load_note()
    assert common.spread([3.0, 1.0, 2.0]) == (1.0, 2.0, 3.0)
    assert "n=3" in common.fmt_spread([3.0, 1.0, 2.0])
