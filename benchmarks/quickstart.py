"""The README's quick-start figures, measured: README command 1's ``flwr run .``, as is.

Runs ``flwr run . --stream --federation-config "num-supernodes=3
client-resources-num-cpus=1"`` with the same environment as README command 1
(``FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``) and no
``--run-config`` (the default config of pyproject.toml), in the simulation engine with a
private FLWR_HOME and free ports (``_common.run_flwr``). It then reads the run folder's
``metrics.json`` (the folder is the one the ServerApp names in its log) and writes
``benchmarks/results/quickstart.md`` and ``quickstart.json`` (what
``scripts/readme_results.py`` puts into the README's quick-start paragraph).

The wall time is the whole command, as a user sees it: SuperLink + Ray start-up, model and
data load (the asset cache is warm: the first use of a ``builtin:`` asset also fetches and
converts it), every round with server evaluation and checkpoints, the summary and plots.

Example (7-10 min on 2 CPU cores)::

    python benchmarks/quickstart.py
    python benchmarks/quickstart.py --model tiny     # quick check of the script only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import _common as C

SUPERNODES = 3  # README command 1
JSON_PATH = C.RESULTS / "quickstart.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="",
                   help="'' = the default config, exactly as README command 1; 'tiny' = a "
                        "quick check with a tiny random model (prints only)")
    return p.parse_args(argv)


def run_folder(log: str, started: float) -> Path:
    """The run folder the ServerApp names (``output <path>``), made absolute."""
    m = re.search(r"fatellm-flwr: algorithm=.*?, output (\S+)", log)
    candidates = []
    if m:
        p = Path(m.group(1))
        candidates += [p] if p.is_absolute() else [C.REPO / p, Path.cwd() / p]
    for c in candidates:
        if (c / "metrics.json").exists():
            return c
    # fall back: the newest run folder written after we started
    fresh = [d for d in (C.REPO / "outputs").glob("*/metrics.json")
             if d.stat().st_mtime >= started]
    if not fresh:
        raise RuntimeError("no run folder with metrics.json found; log tail:\n" + log[-3000:])
    return max(fresh, key=lambda d: d.stat().st_mtime).parent


def summarise(records: list[dict], wall: float, folder: Path, model: str,
              load_start=None) -> dict:
    recs = sorted(records, key=lambda r: r["round"])
    trained = [r for r in recs if r["round"] > 0]
    last = trained[-1] if trained else {}
    return {
        "model": model, "supernodes": SUPERNODES, "rounds": len(trained),
        "wall_s": wall,
        "accuracy": [r.get("server_accuracy") for r in recs],
        "loss": [r.get("server_loss") for r in recs],
        "round_time_s": [r.get("round_time_s") for r in trained],
        "bytes_up_per_client": last.get("bytes_up_per_client"),
        "bytes_down_per_client": last.get("bytes_down_per_client"),
        "up_pct_of_full_model": last.get("up_pct_of_full_model"),
        "run_folder": str(folder), "load_avg_start": load_start, "load_avg": C.load_avg(),
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def report(s: dict, name: str) -> str:
    rows = [[r, acc, loss, rt] for r, (acc, loss, rt) in enumerate(
        zip(s["accuracy"], s["loss"], [None] + s["round_time_s"]))]
    table = C.markdown_table(["round", "server accuracy", "server loss", "round time (s)"],
                             [[a, "-" if b is None else b, "-" if c is None else c,
                               "-" if d is None else round(d, 1)] for a, b, c, d in rows])
    body = (f"README command 1 as is: default config (`{s['model']}`, LoRA, 3 rounds, BBC "
            f"News, Dirichlet 0.5), {s['supernodes']} SuperNodes with 1 CPU each. One "
            f"measurement (the run itself is the figure, not a ratio).\n\n{table}\n\n"
            f"Whole command wall time: **{C.fmt_duration(s['wall_s'])}** "
            f"({s['wall_s']:.0f} s, incl. SuperLink/Ray start-up, model load, server "
            f"evaluation before round 1 and after each round, checkpoints, summary and "
            f"plots).\n\nBytes per client per round: up {s['bytes_up_per_client']:,.0f}, down "
            f"{s['bytes_down_per_client']:,.0f} ({s['up_pct_of_full_model']:.2g}% of the full "
            f"model).\n\nMachine load (1, 5, 15 min): {s.get('load_avg_start')} at the start, "
            f"{s['load_avg']} at the end{C.shared_box_note()}.")
    notes = [f"Run folder: `{s['run_folder']}` (metrics.json parsed into "
             f"`benchmarks/results/{name}.json`).",
             "Environment as README command 1: FLWR_TELEMETRY_ENABLED=0, "
             "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1; the builtin asset cache was "
             "already warm (first use also fetches the model and data packages from PyPI "
             "and converts them)."]
    return C.emit(name, "Quick start: README command 1, measured", body,
                  C.command_line(), notes, write=name == "quickstart")


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = {}
    name = "quickstart"
    if args.model:
        overrides = {"model": C.resolve_model_arg(args.model), "max-examples": 60,
                     "test-size": 10, "local-steps": 2, "max-length": 48, "plots": False}
        name = "quickstart-tiny"
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    started, load_start = time.time(), C.load_avg()
    log, wall = C.run_flwr(overrides, num_supernodes=SUPERNODES, num_cpus=1, timeout=3600)
    folder = run_folder(log, started)
    records = json.loads((folder / "metrics.json").read_text())
    s = summarise(records, wall, folder, args.model or C.pyproject_app_config()["model"],
                  load_start)
    report(s, name)
    if name == "quickstart":  # the tiny check only prints
        JSON_PATH.write_text(json.dumps(s, indent=2) + "\n")
    return s


if __name__ == "__main__":
    main()
