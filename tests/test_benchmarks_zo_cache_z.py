"""benchmarks/zo_cache_z.py runs both arms on a tiny model and checks they agree bit for bit."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.timeout(600)
def test_zo_cache_z_benchmark_tiny(capsys):
    import zo_cache_z as B

    B.main(["--model", "tiny", "--quick", "--threads", "1", "--seq-len", "16"])
    out = capsys.readouterr().out
    assert "| zo-cache-z=true |" in out and "| zo-cache-z=false (default) |" in out
    assert "Weights after both arms: bit-identical." in out
