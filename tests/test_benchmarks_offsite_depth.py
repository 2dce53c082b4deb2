"""benchmarks/offsite_depth.py: split parsing and a tiny sweep over splits with a distilled
emulator (the depth sweep itself runs in tests/test_notebooks_offsite.py)."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import offsite_depth as bench  # noqa: E402


def _args(**kw):
    base = {"configs": "", "depths": "2,6", "bottom": 2, "top": 3}
    return argparse.Namespace(**{**base, **kw})


def test_depths_use_the_fixed_adapter_split():
    assert bench.parse_configs(_args()) == [(2, 2, 3, False), (6, 2, 3, False)]


def test_configs_give_whole_splits_and_distillation():
    got = bench.parse_configs(_args(configs="6/2/2/d, 14/4/1"))
    assert got == [(6, 2, 2, True), (14, 4, 1, False)]
    assert bench.label(got[0]) == "n=6 a=2 b=2 distilled"


@pytest.mark.parametrize("bad", ["6/2", "6/2/2/x", "a/2/2", "6/2/2/d/1"])
def test_bad_configs_name_the_item(bad):
    with pytest.raises(SystemExit, match=f"--configs item {bad!r}: expected n/a/b"):
        bench.parse_configs(_args(configs=bad))


def test_quick_split_sweep_distils_and_reports_the_four_numbers():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "offsite_depth.py"),
                           "--model", "tiny", "--quick", "--configs", "any", "--val-size", "8"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900,  # hang guard
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| n=")]
    rows = [line for line in lines if line.count("|") > 10]
    assert [r.split("|")[1].strip() for r in rows] == ["n=1 a=1 b=1 distilled", "n=0 a=1 b=1"]
    curves = [line.split("|")[2].strip() for line in lines if line.count("|") == 5]
    assert len(curves) == 2 and all(len(c.split("->")) == 2 for c in curves)  # rounds 0, 1
    # early stopping: the round kept on validation, and the plug-in's test accuracy there
    kept = [line.split("|") for line in lines if line.count("|") == 7]
    assert len(kept) == 2 and "Early stopping" in proc.stdout
    for row, curve in zip(kept, curves):
        chosen = int(row[2])
        assert chosen in (0, 1) and float(row[3]) == float(curve.split("->")[chosen])
    first, last = (float(x) for x in rows[0].split("|")[3].split("->"))
    assert first > 0 and last > 0  # the distillation MSE was measured before federating
    assert rows[1].split("|")[3].strip() == "-"  # not distilled
    assert "across splits and distillation" in proc.stdout
    assert "plug-in - zero-shot (acc)" in proc.stdout


def test_report_only_rebuilds_by_round_table_and_best_round(tmp_path):
    res = {"n": 6, "a": 2, "b": 2, "distilled": True, "label": "n=6 a=2 b=2 distilled",
           "layers": 30, "kept": [], "middle": 26, "wall_s": 60.0, "client_blocks": 10,
           "distill_mse": [100.0, 1.0], "train_loss": 0.3,
           "rounds_acc": {"emulator_tuned": [0.2, 0.5, 0.8], "plugin": [0.3, 0.36, 0.28]},
           **{f"{w}_{m}": 0.3 for w in bench.FOUR for m in ("accuracy", "loss")}}
    res["plugin_accuracy"] = 0.28
    path = tmp_path / "results.json"
    path.write_text(json.dumps([res]))
    args = bench.parse_args(["--configs", "6/2/2/d", "--rounds", "2",
                             "--report-only", str(path)])
    text = bench.report(args, json.loads(path.read_text()), None, write=False)
    assert "| n=6 a=2 b=2 distilled | 0.3 -> 0.36 -> 0.28 | 0.2 -> 0.5 -> 0.8 |" in text
    assert "(best after round 1 of 2: plug-in 0.36)" in text
    assert bench.best_round({**res, "rounds_acc": {"plugin": [0.3, 0.2, 0.4]}}) == ""


def test_seeds_repeat_every_split():
    assert bench.parse_args(["--seeds", "1, 2"]).seed_list == [1, 2]
    assert bench.parse_args(["--seed", "7"]).seed_list == [7]
    with pytest.raises(SystemExit, match="--seeds '1,x': expected comma-separated integers"):
        bench.parse_args(["--seeds", "1,x"])
