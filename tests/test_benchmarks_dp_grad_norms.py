"""benchmarks/dp_grad_norms.py: per-sample gradient norms and DP noise vs signal (tiny)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.timeout(600)
def test_noise_and_signal_follow_the_clip(tiny_model_dir):
    import dp_grad_norms as B

    tiny_model_path = str(tiny_model_dir("llama"))

    args = B.parse_args(["--model", tiny_model_path, "--quick", "--threads", "1",
                         "--clips", "1e-4,0.1,1000", "--adapters", "r1-v-last8"])
    res = B.measure(args, tiny_model_path, "r1-v-last8")
    low, mid, high = res["per_clip"]
    assert res["n"] == 4 and res["d"] > 0 and res["min"] <= res["median"] <= res["max"]
    assert low["clipped"] == 1.0 and high["clipped"] == 0.0  # clips every record / none
    # noise is linear in the clip; the signal is at most the clip and, unclipped, the
    # plain mean gradient
    assert high["noise"] == pytest.approx(low["noise"] * 1e7)
    assert low["signal"] <= 1e-4 + 1e-12
    assert high["ratio"] == pytest.approx(high["noise"] / high["signal"])
    assert 0 < res["sigma"] and 0 < res["q"] <= 1 and res["steps"] >= 1
    text = B.report(args, [res], None, write=False)
    assert "| r1-v-last8 |" in text and "noise / signal" in text
