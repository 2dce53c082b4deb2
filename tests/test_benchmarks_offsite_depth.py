"""benchmarks/offsite_depth.py: split parsing and a tiny sweep over splits with a distilled
emulator (the depth sweep itself runs in tests/test_notebooks_offsite.py)."""

import argparse
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
                           "--model", "tiny", "--quick", "--configs", "any"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900,  # hang guard
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| n=")]
    assert [r.split("|")[1].strip() for r in rows] == ["n=1 a=1 b=1 distilled", "n=0 a=1 b=1"]
    first, last = (float(x) for x in rows[0].split("|")[3].split("->"))
    assert first > 0 and last > 0  # the distillation MSE was measured before federating
    assert rows[1].split("|")[3].strip() == "-"  # not distilled
    assert "across splits and distillation" in proc.stdout
    assert "plug-in - zero-shot (acc)" in proc.stdout
