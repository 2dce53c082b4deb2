"""Read run folders: what a run is, how far it got, and its model loaded for use.

A run folder (``<output-dir>/<run-name>/``, see :class:`~fatellm_flwr.outputs.RunDir`)
holds ``config.json`` and, once a round completed, ``checkpoint.json`` and the round's
model folder. Every model folder carries :data:`~fatellm_flwr.outputs.MODEL_MANIFEST`
saying how to load it, so :func:`load_run_model` loads the result of any algorithm the
same way: a peft adapter onto its base model (homo), a full model (FedKSeed ``final/``,
offsite), or FedKSeed's per-round seed coefficients replayed onto the base model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..outputs import (
    CHECKPOINT,
    COEFFS_FILE,
    FINAL,
    FULL_MODEL,
    METRICS_JSON,
    MODEL_MANIFEST,
    PEFT_ADAPTER,
    RUN_CONFIG,
    ZO_COEFFICIENTS,
)

log = logging.getLogger(__name__)

# the headline metric of a run, in order of preference
HEADLINE = ("server_accuracy", "server_rouge-l", "server_perplexity", "server_loss")


class RunError(RuntimeError):
    """A folder that is not a usable run, with what is wrong and what to do."""


@dataclass
class RunInfo:
    """One run folder at a glance (what ``fatellm runs`` lists)."""

    path: Path
    algorithm: str
    rounds_done: int
    rounds_planned: int
    status: str  # finished | resumable | not started | finished (no final/)
    metric: str
    first: float | None
    last: float | None
    bytes_total: float


def is_run(path: str | Path) -> bool:
    """A run folder: its ``config.json`` is a run config (not a model's ``config.json``)."""
    f = Path(path) / RUN_CONFIG
    if not f.is_file():
        return False
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "algorithm" in data and "num-server-rounds" in data


def _require_run(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{str(path)!r} does not exist or is not a folder")
    if not is_run(path):
        raise RunError(f"{str(path)!r} is not a run folder (no run {RUN_CONFIG}); a run "
                       "folder is <output-dir>/<run-name>/ as written by `flwr run`")
    return path


def run_config(path: str | Path) -> Config:
    """The run's validated :class:`Config` (keys this version does not know are dropped)."""
    path = _require_run(path)
    raw = json.loads((path / RUN_CONFIG).read_text())
    known = set(Config.keys())
    unknown = sorted(k for k in raw if k not in known)
    if unknown:
        log.warning("%s: ignoring run-config keys this version does not know: %s", path,
                    ", ".join(unknown))
    return Config.from_run_config({k: v for k, v in raw.items() if k in known})


def read_records(path: str | Path) -> list[dict[str, Any]]:
    f = Path(path) / METRICS_JSON
    return json.loads(f.read_text()) if f.exists() else []


def read_run(path: str | Path) -> RunInfo:
    """Summarise one run folder (:class:`RunError` when it is not one)."""
    path = _require_run(path)
    raw = json.loads((path / RUN_CONFIG).read_text())
    done = 0
    if (path / CHECKPOINT).exists():
        done = int(json.loads((path / CHECKPOINT).read_text()).get("round", 0))
    planned = int(raw.get("num-server-rounds", 0))
    records = read_records(path)
    metric = next((k for k in HEADLINE if any(k in r for r in records)), "")
    pts = [r[metric] for r in records if metric and r.get(metric) is not None]
    if done == 0:
        status = "not started"
    elif done < planned:
        status = "resumable"  # resume-from=<run> continues at round done + 1
    else:
        status = "finished" if (path / FINAL).is_dir() else "finished (no final/)"
    total = sum(float(r.get("bytes_up", 0) or 0) + float(r.get("bytes_down", 0) or 0)
                for r in records)
    return RunInfo(path, str(raw.get("algorithm", "?")), done, planned, status,
                   metric.removeprefix("server_"), pts[0] if pts else None,
                   pts[-1] if pts else None, total)


def list_runs(folder: str | Path = "outputs") -> list[RunInfo]:
    """The run at ``folder``, or the runs directly under it (sorted by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunError(f"{str(folder)!r} does not exist or is not a folder")
    if is_run(folder):
        return [read_run(folder)]
    return [read_run(p) for p in sorted(folder.iterdir()) if p.is_dir() and is_run(p)]


def runs_table(infos: list[RunInfo]) -> str:
    """A markdown table: run, algorithm, rounds, headline metric first -> last, MB sent (up +
    down, all clients and rounds), status."""
    rows = [["run", "algorithm", "rounds", "metric", "first -> last", "MB up+down", "status"]]
    for i in infos:
        change = "-" if i.first is None else f"{i.first:.4g} -> {i.last:.4g}"
        rows.append([i.path.name, i.algorithm, f"{i.rounds_done}/{i.rounds_planned}",
                     i.metric or "-", change, f"{i.bytes_total / 1e6:.2f}", i.status])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- models
def model_folder(path: str | Path) -> Path:
    """``final/`` when the run finished, else the last completed ``round-XXX/``."""
    path = _require_run(path)
    if (path / FINAL).is_dir():
        return path / FINAL
    rounds = sorted(p for p in path.glob("round-[0-9][0-9][0-9]") if p.is_dir())
    if not rounds:
        raise RunError(f"run {str(path)!r} has no finished round yet (no {FINAL}/ and no "
                       "round-XXX/ folder); wait for round 1, or resume it with "
                       f"resume-from={str(path)!r}")
    log.warning("run %s has no %s/ (not finished): using %s", path, FINAL, rounds[-1].name)
    return rounds[-1]


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The folder's manifest; for folders written before manifests, inferred from its files."""
    folder = Path(folder)
    if (folder / MODEL_MANIFEST).exists():
        return json.loads((folder / MODEL_MANIFEST).read_text())
    cfg = run_config(folder.parent)
    if (folder / "adapter_config.json").exists():
        kind = PEFT_ADAPTER
    elif (folder / "config.json").exists():
        kind = FULL_MODEL
    elif (folder / COEFFS_FILE).exists():
        kind = ZO_COEFFICIENTS
    else:
        raise RunError(f"{str(folder)!r} holds no model (no {MODEL_MANIFEST}, adapter or "
                       "model config)")
    return {"format": kind, "algorithm": cfg.algorithm, "base_model": cfg.model,
            "gguf_file": cfg.gguf_file}


def base_model_ref(manifest: dict[str, Any]) -> str:
    """The base model reference to load: as the user gave it, else where it was."""
    ref = manifest["base_model"]
    abspath = manifest.get("base_model_abspath")
    if abspath and not Path(ref).exists() and Path(abspath).exists():
        return abspath
    return ref


def _load_base(manifest: dict[str, Any], device: str):
    from ..models import ModelLoadError, load_base_model

    ref = base_model_ref(manifest)
    try:
        return load_base_model(ref, manifest.get("gguf_file", ""), device=device)
    except ModelLoadError as e:
        raise RunError(f"the run's base model {ref!r} cannot be loaded: {e}") from e


def resolve_model_folder(path: str | Path) -> Path:
    """The model folder for ``path``: a run (its ``final/`` or last round) or a model folder
    inside a run (``<run>/round-002``, ``<run>/best``)."""
    path = Path(path)
    if (path / MODEL_MANIFEST).exists():
        return path
    if not is_run(path) and is_run(path.parent) and path.is_dir():
        return path  # a model folder written before manifests existed
    return model_folder(path)


def load_run_model(path: str | Path, device: str = "cpu"):
    """``(model, tokenizer, manifest)`` of a run's result (``final/``, else the last round),
    or of one model folder inside a run, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    from ..device import place_model, resolve_device
    from ..models import load_tokenizer

    folder = resolve_model_folder(path)
    manifest = read_manifest(folder)
    kind = manifest["format"]
    if kind == PEFT_ADAPTER:
        from peft import PeftModel

        model = PeftModel.from_pretrained(_load_base(manifest, device), folder)
    elif kind == FULL_MODEL:
        model = place_model(AutoModelForCausalLM.from_pretrained(folder),
                            resolve_device(device))
    elif kind == ZO_COEFFICIENTS:
        model = _replay_coefficients(_load_base(manifest, device), folder / COEFFS_FILE)
    else:
        raise RunError(f"{str(folder)!r}: unknown model format {kind!r}")
    if (folder / "tokenizer_config.json").exists():
        tokenizer = load_tokenizer(str(folder))
    else:  # FedKSeed rounds: the base model's tokenizer
        tokenizer = load_tokenizer(base_model_ref(manifest), manifest.get("gguf_file", ""))
    model.eval()
    return model, tokenizer, {**manifest, "folder": str(folder)}


def _replay_coefficients(model, npz_path: Path):
    """FedKSeed: ``x = x0 - sum_s C[s] z_s`` over the tuned tensors (see strategies/fedkseed)."""
    import numpy as np
    import torch

    from ..zo import apply_seed_updates, candidate_seeds, zo_parameters

    with np.load(npz_path) as z:
        coeffs = z["coeffs"]
        meta = json.loads(str(z["meta"]))
    seeds = candidate_seeds(int(meta["zo_num_seeds"]), int(meta["seed"]))
    params = [p for _, p in zo_parameters(model, bool(meta["zo_exclude_embeddings"]))]
    with torch.no_grad():
        apply_seed_updates(params, {int(seeds[i]): float(coeffs[i])
                                    for i in np.flatnonzero(coeffs)})
    return model
