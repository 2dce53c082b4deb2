"""fatellm_flwr.tracking: round records reach TensorBoard / MLflow / W&B, once per value."""

import math

import pytest

from fatellm_flwr.outputs import RunDir
from fatellm_flwr.tracking import Tracker, TrackerError, open_tracker


class Recorder(Tracker):
    def __init__(self):
        super().__init__()
        self.calls = []

    def write(self, step, scalars):
        self.calls.append((step, scalars))


def test_only_new_or_changed_numeric_values_are_sent(tmp_path):
    run = RunDir(tmp_path / "r")
    rec = Recorder()
    run.attach_tracker(rec)
    run.add_record({"round": 0, "server_loss": 2.0, "note": "text", "ok": True})
    run.add_record({"round": 1, "server_loss": 1.5, "bytes_up": 100, "x": math.nan})
    # the strategy adds client evaluation to a written record: only that value is new
    run.add_record({"round": 1, "server_loss": 1.5, "bytes_up": 100, "eval_loss": 1.7})
    assert rec.calls == [(0, {"server_loss": 2.0}), (1, {"server_loss": 1.5, "bytes_up": 100.0}),
                         (1, {"eval_loss": 1.7})]


def test_attaching_replays_existing_records(tmp_path):
    run = RunDir(tmp_path / "r")
    run.add_record({"round": 0, "server_loss": 2.0})
    rec = Recorder()
    RunDir(tmp_path / "r").attach_tracker(rec)  # a resumed run's folder
    assert rec.calls == [(0, {"server_loss": 2.0})]


def test_tensorboard_event_files_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunDir(tmp_path / "r")
    run.attach_tracker(open_tracker("tensorboard", run.path, {"algorithm": "homo"}))
    for rnd, loss in enumerate([2.0, 1.2, 0.7]):
        run.add_record({"round": rnd, "server_loss": loss, "fit_dp_epsilon": 0.5 * rnd})
    run.close_tracker()
    acc = EventAccumulator(str(run.path / "tensorboard"))
    acc.Reload()
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("server/loss")] == \
        [(0, 2.0), (1, 1.2), (2, 0.7)]
    assert [e.value for e in acc.Scalars("fit/dp_epsilon")] == [0.0, 0.5, 1.0]


def test_mlflow_local_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")  # the `test` extra installs it
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = RunDir(tmp_path / "r")
    tracker = open_tracker("mlflow", run.path, {"algorithm": "homo", "lr": 0.001})
    run.attach_tracker(tracker)
    run.add_record({"round": 1, "server_accuracy": 0.5})
    run.add_record({"round": 2, "server_accuracy": 0.75})
    run_id = tracker.run.info.run_id
    run.close_tracker()
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{run.path / 'mlflow.db'}")
    hist = client.get_metric_history(run_id, "server/accuracy")
    assert [(m.step, m.value) for m in hist] == [(1, 0.5), (2, 0.75)]
    assert client.get_run(run_id).data.params["lr"] == "0.001"


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the `test` extra installs it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = RunDir(tmp_path / "r")
    run.attach_tracker(open_tracker("wandb", run.path, {"algorithm": "homo"}))
    run.add_record({"round": 1, "server_accuracy": 0.5})
    run.close_tracker()
    files = list((run.path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files and files[0].stat().st_size > 0


def test_none_writes_nothing_and_unknown_is_refused(tmp_path):
    run = RunDir(tmp_path / "r")
    run.attach_tracker(open_tracker("none", run.path, {}))
    run.add_record({"round": 0, "server_loss": 1.0})
    assert sorted(p.name for p in run.path.iterdir()) == ["metrics.csv", "metrics.json"]
    with pytest.raises(ValueError, match="unknown tracker 'csv'"):
        open_tracker("csv", run.path, {})
    assert issubclass(TrackerError, RuntimeError)
