"""benchmarks/fedkseed_vs_lora.py: where the curves meet, and a tiny end-to-end run."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import fedkseed_vs_lora as bench  # noqa: E402


def _curve(*pts):
    return {"points": [{"round": i, "compute_s": c, "forwards_per_client": f, "loss": loss}
                       for i, (c, f, loss) in enumerate(pts)]}


def test_meeting_interpolates_lora_at_the_same_compute():
    kseed = _curve((0, 0, 3.0), (10, 400, 2.0), (20, 800, 1.0))
    lora = _curve((0, 0, 3.0), (5, 10, 1.5), (20, 40, 1.2))
    # at 10 s LoRA is at 1.5 - 0.3 / 3 = 1.4 < 2.0; at 20 s LoRA is at 1.2 >= 1.0
    assert bench.meeting(kseed, lora, "compute_s").startswith("meet at 20 client compute")
    assert bench.interpolate(lora["points"], "compute_s", 10) == 1.4
    # beyond LoRA's last point: compared with LoRA's final loss, and said so
    assert "reaches LoRA's final loss (1.200" in bench.meeting(kseed, lora, "forwards_per_client")


def test_meeting_reports_the_remaining_gap():
    kseed = _curve((0, 0, 3.0), (10, 400, 2.9))
    lora = _curve((0, 0, 3.0), (20, 40, 0.5))
    text = bench.meeting(kseed, lora, "compute_s")
    assert text.startswith("do not meet") and "2.900" in text and "1.750" in text


def test_quick_run_measures_both_arms():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fedkseed_vs_lora.py"),
                           "--model", "tiny", "--quick"], capture_output=True, text=True,
                          cwd=ROOT, timeout=900,  # hang guard
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| lora", "| fedkseed"))]
    assert len(rows) == 6  # rounds 0, 1, 2 per arm
    # FedKSeed: 2 forwards per ZO step, no backward; LoRA: 1 + 1 per step
    assert rows[-1].split("|")[4].strip() == "24" and rows[-1].split("|")[5].strip() == "0"
    assert rows[2].split("|")[4].strip() == "4" and rows[2].split("|")[5].strip() == "4"
    assert "Do the curves meet?" in proc.stdout
