"""README command 1 with ``wire-dtype=float32`` (the default) and ``float16``, side by side.

Both runs are the quick start exactly as a user runs it (``flwr run .`` in the simulation
engine, 3 SuperNodes with 1 CPU each, the default config of pyproject.toml); the second adds
``--run-config wire-dtype="float16"``, so the LoRA adapter travels as float16 in both
directions while the server aggregates in float32 and keeps the global state in float32.
Reported per round: the server's accuracy and loss on its held-out test set, and the bytes per
client and round. The test set's binomial standard error is the noise an accuracy difference
is compared with (the runs are otherwise deterministic: same seeds, data and partitions).

    python benchmarks/wire_dtype.py                 # ~2 x the quick start's wall time
    python benchmarks/wire_dtype.py --model tiny    # check of the script only (prints)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import _common as C
from quickstart import SUPERNODES, run_folder, summarise

NAME = "wire_dtype"
DTYPES = ("float32", "float16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="'' = the default config; 'tiny' = quick check")
    return p.parse_args(argv)


def run(dtype: str, base: dict) -> dict:
    started, load_start = time.time(), C.load_avg()
    log, wall = C.run_flwr({**base, "wire-dtype": dtype} if dtype != "float32" else base,
                           num_supernodes=SUPERNODES, num_cpus=1, timeout=3600)
    folder = run_folder(log, started)
    records = json.loads((folder / "metrics.json").read_text())
    s = summarise(records, wall, folder, base.get("model") or C.pyproject_app_config()["model"],
                  load_start)
    s["wire_dtype"] = dtype
    print(dtype, {k: s[k] for k in ("accuracy", "loss", "bytes_up_per_client", "wall_s")},
          flush=True)
    return s


def main(argv=None) -> None:
    args = parse_args(argv)
    base: dict = {}
    if args.model:
        base = {"model": C.resolve_model_arg(args.model), "max-examples": 60, "test-size": 10,
                "local-steps": 2, "max-length": 48, "plots": False}
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    runs = {d: run(d, base) for d in DTYPES}
    a, b = runs["float32"], runs["float16"]
    n_test = int(C.app_config(base).test_size)
    rows = []
    for r, (acc32, acc16, l32, l16) in enumerate(zip(a["accuracy"], b["accuracy"], a["loss"],
                                                    b["loss"])):
        rows.append([r, acc32, acc16, round(acc16 - acc32, 3), l32, l16])
    table = C.markdown_table(["round", "accuracy float32", "accuracy float16", "difference",
                              "loss float32", "loss float16"], rows)
    final32 = a["accuracy"][-1]
    se = math.sqrt(max(final32 * (1 - final32), 1e-12) / n_test)
    ratio = a["bytes_up_per_client"] / b["bytes_up_per_client"]
    bytes_table = C.markdown_table(
        ["wire-dtype", "bytes up per client-round", "bytes down per client-round",
         "whole command wall time"],
        [[s["wire_dtype"], f"{s['bytes_up_per_client']:,.0f}",
          f"{s['bytes_down_per_client']:,.0f}", C.fmt_duration(s["wall_s"])]
         for s in (a, b)])
    diff = b["accuracy"][-1] - final32
    verdict = "within" if abs(diff) <= 2 * se else "outside"
    body = "\n".join([
        f"README command 1 (`{a['model']}`, LoRA, {a['rounds']} rounds, {SUPERNODES} "
        f"SuperNodes x 1 CPU), run twice one after the other: `wire-dtype=float32` (default), "
        f"then `float16`. Server test set: {n_test} examples.", "", table, "", bytes_table, "",
        f"Final accuracy difference (float16 - float32): {diff:+.3f}; binomial standard error "
        f"of one accuracy on {n_test} examples: {se:.3f}, so the difference is {verdict} two "
        f"standard errors. Bytes float32 / float16: {ratio:.3f}x.", "",
        f"Machine load (1, 5, 15 min) at the start / end: {a['load_avg_start']} / "
        f"{b['load_avg']}{C.shared_box_note()}."])
    notes = [f"Run folders: `{a['run_folder']}`, `{b['run_folder']}`.",
             "Wall times are one run each on a shared box (not a ratio benchmark); the figure "
             "here is accuracy and bytes."]
    summary = [("Quick start, final accuracy with wire-dtype float32 / float16",
                f"{final32:.2f} / {b['accuracy'][-1]:.2f} (difference {diff:+.2f}, standard "
                f"error {se:.2f}); bytes {ratio:.2f}x smaller")]
    C.emit(NAME, "wire-dtype float16 vs float32 on the quick start", body, C.command_line(),
           notes, write=not args.model, summary=summary)
    if not args.model:
        (C.RESULTS / f"{NAME}.json").write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
