"""benchmarks/dp_settings.py: repeated seeds pair each DP arm with its own seed's no-DP arm."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _res(name: str, seed: int, acc: list[float], eps: float | None) -> dict:
    return {"name": name, "seed": seed, "clients": 3, "wall_s": 1.0, "rounds": len(acc) - 1,
            "acc": acc, "loss": [1.0] * len(acc), "eps": eps, "noise": None if eps is None
            else 0.6, "train_loss": 1.0, "clients_ok": [3] * (len(acc) - 1), "record": {}}


def test_repeated_seeds_report_per_seed_and_pooled_fractions():
    import dp_settings as B

    args = B.prepare(["--seeds", "1,2", "--arms", "no-dp,eps-8"])
    assert B.seeds_of(args) == [1, 2]
    assert B.seeds_of(B.prepare([])) == [42]
    results = [_res("no-dp", 1, [0.2, 0.6], None), _res("eps-8", 1, [0.2, 0.5], 7.9),
               _res("no-dp", 2, [0.3, 0.5], None), _res("eps-8", 2, [0.3, 0.35], 7.9)]
    (question, answer), = B.repeated_summary(results, args)
    assert "eps-8" in question and "2 seeds" in question
    # per seed: 0.3/0.4 = 0.75 and 0.05/0.2 = 0.25; pooled: mean gain 0.175 / 0.3
    assert "0.5 (min 0.25, max 0.75, n=2)" in answer
    assert "0.175 / 0.300 = 0.583" in answer
    text = B.report(args, results, None, "cmd", write=False)
    assert "| eps-8 | 2 | 3 |" in text and "| 0.25 |" in text and "| 0.75 |" in text


def test_seeds_must_be_integers():
    import dp_settings as B

    with pytest.raises(SystemExit, match="comma-separated integers, got '1,x'"):
        B.seeds_of(B.prepare(["--seeds", "1,x"]))
