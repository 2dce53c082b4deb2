"""Experiment tracking: each round's record goes to TensorBoard, MLflow or Weights & Biases.

``tracker=none`` (default) writes nothing beyond the run folder's metrics.json/csv.
``tensorboard`` writes event files under ``<run>/tensorboard/`` (``tensorboard --logdir
<run>``); ``mlflow`` logs to ``MLFLOW_TRACKING_URI`` or, when unset, a SQLite store at
``<run>/mlflow.db`` (``mlflow ui --backend-store-uri sqlite:///<run>/mlflow.db``; MLflow 3
no longer develops its file store); ``wandb`` logs to the
project ``fatellm-flwr`` in the mode ``WANDB_MODE`` says (``offline`` keeps it under
``<run>/wandb``; ``wandb sync`` uploads it later). mlflow and wandb are optional
(``pip install 'fatellm-flwr[tracking]'``).

Only numeric values travel (round metrics, bytes, epsilon, timings), with the round as
the step. A record is re-sent when later values arrive for the same round (client
evaluation comes after the server's); each tracker gets every (round, key) once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TRACKERS = ("none", "tensorboard", "mlflow", "wandb")


class TrackerError(RuntimeError):
    """A tracker that cannot start here (missing package), with what to install."""


class Tracker:
    """Receives one scalar per (round, key). The base class drops them (``tracker=none``)."""

    def __init__(self) -> None:
        self._sent: dict[tuple[int, str], float] = {}

    def log_record(self, record: Mapping[str, Any]) -> None:
        """Send the numeric values of a round record not sent before (or changed)."""
        step = int(record["round"])
        new = {}
        for key, value in record.items():
            if key == "round" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            value = float(value)
            if not math.isfinite(value) or self._sent.get((step, key)) == value:
                continue
            self._sent[(step, key)] = value
            new[key] = value
        if new:
            self.write(step, new)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Write scalars for one step (subclasses)."""

    def close(self) -> None:
        """Flush and release the backend."""


class TensorBoardTracker(Tracker):
    """Event files under ``<run>/tensorboard`` via ``torch.utils.tensorboard``."""

    def __init__(self, run_path: Path, config: Mapping[str, Any]):
        super().__init__()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise TrackerError("tracker='tensorboard' needs the tensorboard package: "
                               "pip install 'fatellm-flwr[tracking]'") from e
        self.writer = SummaryWriter(log_dir=str(run_path / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(_tag(key), value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    """One MLflow run per federated run; file store in the run folder unless configured."""

    def __init__(self, run_path: Path, config: Mapping[str, Any]):
        super().__init__()
        try:
            import mlflow
        except ImportError as e:
            raise TrackerError("tracker='mlflow' needs mlflow: pip install "
                               "'fatellm-flwr[tracking]' (or mlflow-skinny)") from e
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(f"sqlite:///{(run_path / 'mlflow.db').resolve()}")
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "fatellm-flwr"))
        self.run = mlflow.start_run(run_name=run_path.name)
        # mlflow caps a param value at 6000 characters; the config's are short
        mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.mlflow.log_metrics({_mlflow_key(k): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class WandbTracker(Tracker):
    """A Weights & Biases run (``WANDB_MODE=offline`` keeps it local under the run folder)."""

    def __init__(self, run_path: Path, config: Mapping[str, Any]):
        super().__init__()
        try:
            import wandb
        except ImportError as e:
            raise TrackerError("tracker='wandb' needs wandb: pip install "
                               "'fatellm-flwr[tracking]'") from e
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fatellm-flwr"),
                              name=run_path.name, dir=str(run_path), config=dict(config),
                              reinit="create_new")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({_tag(k): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def _tag(key: str) -> str:
    """``server_accuracy`` -> ``server/accuracy``: one section per source in the UIs."""
    head, sep, tail = key.partition("_")
    return f"{head}/{tail}" if sep and head in ("server", "fit", "eval", "client") else key


def _mlflow_key(key: str) -> str:
    return _tag(key).replace("-", "_")


def open_tracker(name: str, run_path: str | Path, config: Mapping[str, Any]) -> Tracker:
    """The tracker ``name`` (one of :data:`TRACKERS`) for the run folder ``run_path``."""
    run_path = Path(run_path)
    if name == "none":
        return Tracker()
    cls = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker,
           "wandb": WandbTracker}.get(name)
    if cls is None:
        raise ValueError(f"unknown tracker {name!r}; allowed: {', '.join(TRACKERS)}")
    return cls(run_path, config)
