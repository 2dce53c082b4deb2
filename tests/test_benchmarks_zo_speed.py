"""benchmarks/zo_speed.py runs every arm on a tiny model and checks they agree bit for bit."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.timeout(600)
def test_zo_speed_benchmark_tiny(capsys):
    import zo_speed as B

    from fatellm_flwr import zo

    B.main(["--model", "tiny", "--quick", "--threads", "2", "--seq-len", "16"])
    out = capsys.readouterr().out
    for arm in B.STEP_ARMS:
        assert f"| {arm} |" in out
    assert "| threaded |" in out and "Weights after all arms: bit-identical." in out
    assert zo.PARALLEL_Z is True  # restored after the one-thread arms
