"""best-metric: the round that scores best on validation data is kept in ``best/``, the
selection survives a resume, and the summary reports the selected round's test numbers."""

import math

import numpy as np
from flwr.common import Code, EvaluateRes, Status, ndarrays_to_parameters

from fatellm_flwr.config import Config
from fatellm_flwr.outputs import RunDir
from fatellm_flwr.strategies.base import TrackedStrategy
from fatellm_flwr.strategies.best import BEST, best_round, improves, minimised
from fatellm_flwr.strategies.homo import build_aggregator
from fatellm_flwr.testing import FakeProxy as Proxy


def test_direction_ties_and_non_finite_values():
    assert minimised("server_val_loss") and minimised("eval_perplexity")
    assert not minimised("server_val_accuracy") and not minimised("eval_rouge-l")
    recs = [{"round": 0, "m_loss": 2.0}, {"round": 1, "m_loss": 1.0}, {"round": 2},
            {"round": 3, "m_loss": 1.0}, {"round": 4, "m_loss": math.nan}]
    assert best_round(recs, "m_loss") == (1, 1.0)  # the earliest of a tie
    assert best_round(recs, "m_loss", exclude=1) == (3, 1.0)
    assert best_round(recs, "m_accuracy") is None
    acc = [{"round": 0, "m_accuracy": 0.2}, {"round": 1, "m_accuracy": 0.5}]
    assert best_round(acc, "m_accuracy") == (1, 0.5)
    assert improves("m_loss", 0.5, (1, 1.0)) and not improves("m_loss", 1.0, (1, 1.0))
    assert improves("m_accuracy", 0.6, (1, 0.5)) and not improves("m_accuracy", 0.4, (1, 0.5))
    assert improves("m_loss", 3.0, None) and not improves("m_loss", math.nan, None)


class Saving(TrackedStrategy):
    """Validation loss = the first weight; save_round records where it wrote."""

    def __init__(self, cfg, run, initial, round_offset=0):
        super().__init__(cfg, build_aggregator(cfg, initial), run, initial, full_model_bytes=1,
                         round_offset=round_offset,
                         validate_fn=lambda arrays: {"loss": float(arrays[0][0])})
        self.saved: list[tuple[int, str, float]] = []

    def save_round(self, server_round, arrays, folder, final):
        self.saved.append((server_round, folder.name, float(arrays[0][0])))


def run_rounds(s, values, start=0):
    for k, v in enumerate(values, start):
        s.evaluate(k - s.round_offset, ndarrays_to_parameters([np.array([v], np.float32)]))


def test_server_validation_selects_and_resume_continues(tmp_path):
    cfg = Config.from_run_config({"server-eval": False, "server-val-size": 5,
                                  "best-metric": "server_val_loss", "save-every-round": False})
    s = Saving(cfg, RunDir(tmp_path / "run"), [np.zeros(1, np.float32)])
    run_rounds(s, [2.0, 1.5, 1.75])
    assert s.saved == [(0, BEST, 2.0), (1, BEST, 1.5)]  # round 2 is worse: best/ kept
    recs = s.run.records
    assert [r["server_val_loss"] for r in recs] == [2.0, 1.5, 1.75]
    assert [r["best_round"] for r in recs] == [0, 1, 1]
    assert "best round by server_val_loss: 1 (1.5000; saved in best/)" in s.headline()
    # a resumed run (new process, round offset 2) continues the same selection
    resumed = Saving(cfg, RunDir(tmp_path / "run"), [np.zeros(1, np.float32)], round_offset=2)
    run_rounds(resumed, [1.625, 1.25], start=3)
    assert resumed.saved == [(4, BEST, 1.25)]
    assert [r["best_round"] for r in resumed.run.records] == [0, 1, 1, 1, 4]


def test_clients_validation_selects_the_round(tmp_path):
    cfg = Config.from_run_config({"server-eval": False, "best-metric": "eval_accuracy",
                                  "fraction-evaluate": 1.0, "save-every-round": False})
    s = Saving(cfg, RunDir(tmp_path / "run"), [np.zeros(1, np.float32)])
    for rnd, (acc, w) in enumerate([(0.4, 7.0), (0.3, 8.0), (0.6, 9.0)], start=1):
        s.current = [np.array([w], np.float32)]
        s.evaluate(rnd, ndarrays_to_parameters(s.current))
        res = [(Proxy("a"), EvaluateRes(Status(Code.OK, ""), 1.0, 10, {"accuracy": acc}))]
        s.aggregate_evaluate(rnd, res, [])
    # the state saved is the round's aggregated one (the evaluate step follows the fit)
    assert s.saved == [(1, BEST, 7.0), (3, BEST, 9.0)]
    assert [r.get("best_round") for r in s.run.records] == [1, 1, 3]
