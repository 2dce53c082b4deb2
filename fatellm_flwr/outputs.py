"""A run's output folder: atomic checkpoints, per-round metrics, plots and the summary."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.json"
STATE = "state.npz"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
RUN_CONFIG = "config.json"
FINAL = "final"
# what a saved model folder (round-XXX/ or final/) holds and what loading it needs
MODEL_MANIFEST = "fatellm-model.json"
PEFT_ADAPTER = "peft-adapter"  # adapter_config.json + weights; base model named in the manifest
FULL_MODEL = "full-model"  # a complete transformers model folder
ZO_COEFFICIENTS = "fedkseed-coefficients"  # FedKSeed's C: replayed onto the base model
COEFFS_FILE = "fedkseed-coefficients.npz"  # the file that holds it


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=_json_default).encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class RunDir:
    """``<output-dir>/<run-name>/``: everything one run writes.

    Layout: ``config.json``, ``checkpoint.json`` + ``state.npz`` (last completed round,
    global state, strategy state), ``metrics.json``/``metrics.csv`` (one record per
    round), ``round-XXX/`` (the global adapter or model after each round), ``final/``,
    ``plots/*.png``, ``tensorboard/`` (with ``tracker=tensorboard``). Model folders are
    written by :func:`save_model_folder` (tokenizer + :data:`MODEL_MANIFEST` included).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        self.tracker = None  # a fatellm_flwr.tracking.Tracker fed by add_record
        if (self.path / METRICS_JSON).exists():
            self.records = json.loads((self.path / METRICS_JSON).read_text())

    def attach_tracker(self, tracker) -> None:
        """Send every record added from now on (and those already there) to ``tracker``."""
        self.tracker = tracker
        for record in self.records:
            tracker.log_record(record)

    def close_tracker(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    @classmethod
    def create(cls, output_dir: str, run_name: str, algorithm: str) -> RunDir:
        name = run_name or f"{algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = Path(output_dir) / name
        if path.exists() and (path / CHECKPOINT).exists():
            raise FileExistsError(f"run folder {str(path)!r} already holds a run; pick another "
                                  f"run-name or continue it with resume-from={str(path)!r}")
        return cls(path)

    def round_dir(self, server_round: int) -> Path:
        return self.path / f"round-{server_round:03d}"

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, server_round: int, arrays: dict[str, np.ndarray],
                        meta: dict[str, Any]) -> None:
        """Write state then the pointer to it, each atomically (the pointer last)."""
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(self.path / STATE, buf.getvalue())
        atomic_write_json(self.path / CHECKPOINT, {"round": server_round, **meta})

    def load_checkpoint(self) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
        ckpt = self.path / CHECKPOINT
        if not ckpt.exists():
            raise FileNotFoundError(f"resume-from={str(self.path)!r} has no {CHECKPOINT}: "
                                    "not a run folder, or no round completed yet")
        meta = json.loads(ckpt.read_text())
        with np.load(self.path / STATE) as z:
            arrays = {k: z[k] for k in z.files}
        return int(meta.pop("round")), arrays, meta

    # ---------------------------------------------------------------- metrics
    def add_record(self, record: dict[str, Any]) -> None:
        """Append (or replace, for the same round) one round's flat metrics record."""
        self.records = [r for r in self.records if r.get("round") != record["round"]]
        self.records.append(record)
        self.records.sort(key=lambda r: r["round"])
        atomic_write_json(self.path / METRICS_JSON, self.records)
        keys = sorted({k for r in self.records for k in r}, key=lambda k: (k != "round", k))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.records)
        atomic_write_bytes(self.path / METRICS_CSV, out.getvalue().encode())
        if self.tracker is not None:
            self.tracker.log_record(record)

    def summary_table(self) -> str:
        """A plain-text table of the headline metrics per round."""
        if not self.records:
            return "(no rounds recorded)"
        preferred = ["round", "server_loss", "server_accuracy", "server_rouge-l",
                     "server_perplexity", "fit_train_loss", "bytes_up", "bytes_down",
                     "up_pct_of_full_model", "round_time_s"]
        present = {k for r in self.records for k in r}
        cols = [c for c in preferred if c in present]
        cols += sorted(k for k in present if k.startswith("server_") and k not in cols)
        rows = [[_fmt(r.get(c)) for c in cols] for r in self.records]
        widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
        line = "  ".join(c.rjust(w) for c, w in zip(cols, widths))
        body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
        return "\n".join([line, "-" * len(line), *body])

    def plot(self) -> list[Path]:
        """PNG plots: server metrics and losses per round, cumulative MB sent."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir = self.path / "plots"
        out_dir.mkdir(exist_ok=True)
        written: list[Path] = []
        rounds = [r["round"] for r in self.records]
        groups = {
            "metrics.png": [k for k in ("server_accuracy", "server_rouge-l",
                                        "server_val_accuracy", "server_val_rouge-l") if
                            any(k in r for r in self.records)],
            "loss.png": [k for k in ("server_loss", "server_val_loss", "fit_train_loss",
                                     "eval_loss") if any(k in r for r in self.records)],
        }
        for name, keys in groups.items():
            if not keys:
                continue
            fig, ax = plt.subplots(figsize=(5, 3.2))
            for k in keys:
                pts = [(r["round"], r[k]) for r in self.records
                       if k in r and r[k] is not None and math.isfinite(r[k])]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=k)
            ax.set_xlabel("round")
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=120)
            plt.close(fig)
            written.append(out_dir / name)
        if any("bytes_up" in r for r in self.records):
            fig, ax = plt.subplots(figsize=(5, 3.2))
            for k in ("bytes_up", "bytes_down"):
                ax.plot(rounds, np.cumsum([r.get(k, 0.0) for r in self.records]) / 2**20,
                        marker="o", label=f"cumulative {k[6:]} (MB)")
            ax.set_xlabel("round")
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(out_dir / "communication.png", dpi=120)
            plt.close(fig)
            written.append(out_dir / "communication.png")
        return written


def model_manifest(kind: str, algorithm: str, base_model: str, gguf_file: str = "",
                   server_round: int = 0) -> dict[str, Any]:
    """What :data:`MODEL_MANIFEST` holds: the folder's format, algorithm, round, and the base
    model as the user gave it (plus its absolute path when it is a local folder)."""
    manifest: dict[str, Any] = {"format": kind, "algorithm": algorithm,
                                "round": int(server_round), "base_model": base_model,
                                "gguf_file": gguf_file}
    if Path(base_model).exists():  # a local folder: also where it was, for other cwds
        manifest["base_model_abspath"] = str(Path(base_model).resolve())
    return manifest


def save_model_folder(out_dir: str | Path, model, tokenizer, *, kind: str, algorithm: str,
                      base_model: str, gguf_file: str = "", server_round: int = 0,
                      extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a self-contained model folder atomically (temp folder, then rename).

    ``model.save_pretrained`` (a peft adapter for ``kind=PEFT_ADAPTER``, a whole model for
    ``FULL_MODEL``), the tokenizer (with its chat template), ``extra_files``, and
    :data:`MODEL_MANIFEST`: the kind, algorithm, round, and the base model as the user gave
    it (hub id, path or ``builtin:<name>``). A peft adapter's ``base_model_name_or_path``
    is set to that reference too, never to a private cache folder.
    """
    from .models import save_adapter

    manifest = model_manifest(kind, algorithm, base_model, gguf_file, server_round)

    class _Folder:  # duck-typed for save_adapter's atomic save
        def save_pretrained(self, path) -> None:
            path = Path(path)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            if kind == PEFT_ADAPTER:
                cfg_path = path / "adapter_config.json"
                adapter_cfg = json.loads(cfg_path.read_text())
                adapter_cfg["base_model_name_or_path"] = base_model
                cfg_path.write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True))
            for name, data in (extra_files or {}).items():
                (path / name).write_bytes(data)
            (path / MODEL_MANIFEST).write_text(json.dumps(manifest, indent=2))

    return save_adapter(_Folder(), out_dir)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1e5:
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)
