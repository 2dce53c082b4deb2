"""Many registered clients: server peak RSS and round time at 10 / 100 / 1,000 SuperNodes.

Flower's simulation engine with ``num-supernodes`` = 10, 100, 1000 and 10 clients sampled
per round (``fraction-fit`` = 10 / N), a tiny random Llama, the same synthetic 3-topic
dataset (``--examples`` rows, IID partitions) and the same local work per sampled client
(``local-steps`` x ``batch-size``), so only the number of registered clients changes.
The ServerApp writes its peak RSS (``server_resources.json``); round times come from the
run's ``metrics.json`` (rounds after the first; round 1 includes Ray actors' start-up).
Clients whose partition is empty are skipped by design and counted.

    python benchmarks/scale.py                 # 10, 100, 1000 clients, 2 repetitions
    python benchmarks/scale.py --clients 10 1000 --repeats 1 --no-write
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    Interleaved,
    command_line,
    emit,
    fmt_spread,
    markdown_table,
    read_metrics,
    run_flwr,
    tiny_model,
)

SAMPLED = 10


def write_dataset(path: Path, n: int) -> Path:
    topics = {"sport": "the team won the match", "business": "shares rose in trading",
              "tech": "a new phone was released"}
    names = list(topics)
    with path.open("w") as f:
        for i in range(n):
            label = names[i % 3]
            f.write(json.dumps({"text": f"{topics[label]} {i}", "label": label}) + "\n")
    return path


def run_once(n_clients: int, model: str, data: Path, out: Path, rounds: int, rep: int) -> dict:
    name = f"scale-{n_clients}-{rep}"
    cfg = {"model": model, "dataset": str(data), "test-size": 30, "max-examples": 0,
           "partitioner": "iid", "val-fraction": 0.0, "num-server-rounds": rounds,
           "local-steps": 2, "batch-size": 4, "max-length": 32, "fraction-fit":
           SAMPLED / n_clients, "min-fit-clients": SAMPLED, "min-available-clients": n_clients,
           "fraction-evaluate": 0.0, "plots": False, "save-every-round": False,
           "output-dir": str(out), "run-name": name}
    t0 = time.perf_counter()
    output, wall = run_flwr(cfg, num_supernodes=n_clients, num_cpus=1,
                            log_path=out / f"{name}.log")
    if "Summary (" not in output:
        raise RuntimeError(f"the ServerApp did not finish ({name}):\n{output[-4000:]}")
    records = read_metrics(out, name)
    res = json.loads((out / name / "server_resources.json").read_text())
    later = [r["round_time_s"] for r in records[2:]] or [records[1]["round_time_s"]]
    return {"wall_s": wall, "elapsed_s": time.perf_counter() - t0,
            "peak_rss_mb": res["peak_rss_mb"], "round_s": later,
            "ok": sum(r["clients_ok"] for r in records[1:]),
            "skipped": sum(r.get("clients_skipped", 0) for r in records[1:]),
            "failed": sum(r["clients_failed"] for r in records[1:]),
            "rounds": len(records) - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--examples", type=int, default=3000)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fatellm-scale-"))
    model = tiny_model(tmp)
    data = write_dataset(tmp / "topics.jsonl", args.examples)
    out = tmp / "out"
    arms = {n: (lambda rep, n=n: run_once(n, model, data, out, args.rounds, rep))
            for n in args.clients}
    bench = Interleaved({str(n): fn for n, fn in arms.items()}).run(args.repeats)
    rows = []
    for n in args.clients:
        rs = bench.results[str(n)]
        rows.append([f"{n:,}", SAMPLED, fmt_spread([r["peak_rss_mb"] for r in rs], 4, " MB"),
                     fmt_spread([t for r in rs for t in r["round_s"]], 3, " s"),
                     fmt_spread([r["wall_s"] for r in rs], 3, " s"),
                     f"{sum(r['ok'] for r in rs)} / {sum(r['skipped'] for r in rs)} / "
                     f"{sum(r['failed'] for r in rs)}"])
    table = markdown_table(["registered clients", "sampled per round", "ServerApp peak RSS",
                            "round time (rounds 2+)", "whole `flwr run`",
                            "client results ok / skipped / failed"], rows)
    base = bench.results[str(args.clients[0])]
    top = bench.results[str(args.clients[-1])]
    rss_ratio = (sorted(r["peak_rss_mb"] for r in top)[len(top) // 2]
                 / sorted(r["peak_rss_mb"] for r in base)[len(base) // 2])
    notes = [
        f"{args.rounds} rounds per run, {args.repeats} repetitions per size, interleaved; "
        f"tiny random Llama, {args.examples} synthetic examples (IID), 2 local steps of 4 "
        "examples per sampled client, server evaluation on 30 held-out examples each round.",
        "ServerApp peak RSS: `getrusage(RUSAGE_SELF).ru_maxrss` of the process running the "
        "ServerApp (in the simulation engine it also drives Ray; the clients run in Ray "
        "actor processes, not counted).",
        f"Peak RSS at {args.clients[-1]:,} vs {args.clients[0]:,} registered clients: "
        f"x{rss_ratio:.2f} (medians).",
        "Skipped = a sampled client whose partition had no example (logged, not a failure).",
        bench.load_note(),
    ]
    sizes = " / ".join(f"{n:,}" for n in args.clients)

    def medians(key: str, fmt: str) -> str:
        vals = [sorted(r[key] for r in bench.results[str(n)]) for n in args.clients]
        return " / ".join(format(v[len(v) // 2], fmt) for v in vals)

    summary = [(f"ServerApp peak RSS and whole-run time at {sizes} registered clients, 10 sampled "
                "per round (tiny Llama)",
                f"peak RSS {medians('peak_rss_mb', '.0f')} MB (x{rss_ratio:.2f} at "
                f"{args.clients[-1]:,} vs {args.clients[0]:,}); whole run "
                f"{medians('wall_s', '.0f')} s; {args.repeats} repetition(s) per size")]
    emit("scale", "Many registered clients (10 sampled per round)", table, command_line(),
         notes, write=not args.no_write, summary=summary)


if __name__ == "__main__":
    main()
