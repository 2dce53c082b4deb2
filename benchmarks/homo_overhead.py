"""Flower overhead: a simulated FedHomoLLM round vs the same local training in plain torch.

Both sides do exactly the same per-client work, scheduled the same way:

- **flwr**: a real ``flwr run .`` simulation (N SuperNodes, ``client-resources-num-cpus=1``,
  so N Ray actors train in parallel with 1 torch thread each, set by ``client_app``), R
  rounds, server evaluation off (``server-eval=false``, ``fraction-evaluate=0``) so a
  round is training + communication + aggregation. Per-round wall time is
  ``round_time_s`` from the run's metrics.json (from ``configure_fit`` to the end of
  aggregation).
- **plain**: N Python processes started with ``multiprocessing`` (no Flower runtime), each
  with ``torch.set_num_threads(1)``, loading the model with ``models.load_peft_model`` and
  its partition with ``clients.homo.client_datasets``, then per round doing what
  ``HomoClient.fit`` does: ``set_trainable_state`` -> ``train.train_local`` (same steps,
  same per-round seeds) -> ``get_trainable_state``. A barrier starts and ends each round
  in all processes together; the round time is the parent's wall time between barriers
  (= the slowest client, as in a Flower round). No aggregation (it is part of what the
  Flower side pays for).

- **flwr-full**: the same simulation as a user runs it: the app's defaults for what
  happens between rounds (server evaluation before round 1 and after every round,
  ``save-every-round``, plots at the end) on top of the same training. Its round time is
  everything a round costs: the interval between two consecutive ``checkpoint.json``
  writes (training + communication + aggregation + server evaluation + saving the round's
  adapter + checkpoint), taken from the files' modification times (polled every 20 ms).

Round 1 is reported separately on both sides (the Flower actors load the model and
tokenize their partition inside round 1; the plain processes warm up), so the overhead
ratio uses rounds 2..R. Repetitions are interleaved (plain, flwr, flwr-full, plain, ...:
``_common.Interleaved``); min / median / max over repetitions are reported with the
machine's load.

Example (a few minutes on 2 CPU cores)::

    python benchmarks/homo_overhead.py
    python benchmarks/homo_overhead.py --model tiny    # quick check with a tiny random model
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path

import _common as C

TARGET = 1.15


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct",
                   help="model ref, or 'tiny' for a tiny random Llama (quick check only)")
    p.add_argument("--clients", type=int, default=2,
                   help="clients (= parallel processes / Ray actors, 1 CPU each)")
    p.add_argument("--rounds", type=int, default=4,
                   help="rounds per run (round 1 is warm-up; rounds 2..R are compared)")
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-examples", type=int, default=200)
    p.add_argument("--peft-method", default="lora",
                   choices=("lora", "ia3", "prompt-tuning", "prefix-tuning"))
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved repetitions of (plain, flwr, flwr-full)")
    p.add_argument("--test-size", type=int, default=50,
                   help="server test examples (the app default; evaluated by flwr-full)")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args()


def overrides_for(args: argparse.Namespace, model_ref: str, out_dir: Path,
                  run_name: str) -> dict:
    return {
        "algorithm": "homo", "model": model_ref, "dataset": "builtin:bbc-news",
        "peft-method": args.peft_method, "num-server-rounds": args.rounds,
        "local-steps": args.local_steps, "local-epochs": 0.0, "batch-size": args.batch_size,
        "grad-accum": 1, "max-length": args.max_length, "max-examples": args.max_examples,
        "test-size": args.test_size, "partitioner": "iid", "seed": args.seed,
        "aggregator": "fedavg",
        "fraction-fit": 1.0, "min-fit-clients": args.clients,
        "min-available-clients": args.clients, "fraction-evaluate": 0.0,
        "server-eval": False, "plots": False, "save-every-round": False,
        "output-dir": str(out_dir), "run-name": run_name,
    }


def full_overrides(args: argparse.Namespace, model_ref: str, out_dir: Path,
                   run_name: str) -> dict:
    """The same training, with the app's defaults for evaluation, saving and plots."""
    defaults = C.pyproject_app_config()
    o = overrides_for(args, model_ref, out_dir, run_name)
    for key in ("server-eval", "plots", "save-every-round"):
        o[key] = defaults[key]
    return o


# --------------------------------------------------------------------------- plain side
def plain_client(pid: int, num: int, overrides: dict, rounds: int, barrier, queue) -> None:
    """One client process: HomoClient.fit's work per round, without any Flower runtime."""
    import torch

    torch.set_num_threads(1)
    from fatellm_flwr.clients.homo import client_datasets
    from fatellm_flwr.models import get_trainable_state, load_peft_model, set_trainable_state
    from fatellm_flwr.train import train_local

    cfg = C.app_config(overrides)
    model, tok = load_peft_model(cfg)
    _, train, _, _ = client_datasets(cfg, tok, pid, num)
    params = get_trainable_state(model)
    barrier.wait()  # ready
    for rnd in range(1, rounds + 1):
        barrier.wait()  # round start
        t0 = time.perf_counter()
        set_trainable_state(model, params)
        seed = cfg.seed + 1000 * rnd + pid  # HomoClient's per-round seed
        torch.manual_seed(seed)
        train_local(model, train, cfg, steps=cfg.local_steps, pad_id=tok.pad_token_id,
                    seed=seed)
        params = get_trainable_state(model)
        queue.put((pid, rnd, time.perf_counter() - t0))
        barrier.wait()  # round end


def run_plain(args: argparse.Namespace, overrides: dict) -> dict:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(args.clients + 1)
    queue = ctx.Queue()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=plain_client, args=(pid, args.clients, overrides, args.rounds,
                                                    barrier, queue))
             for pid in range(args.clients)]
    for p in procs:
        p.start()
    try:
        barrier.wait(timeout=900)
        startup = time.perf_counter() - t0
        rounds = []
        for _ in range(args.rounds):
            barrier.wait(timeout=900)
            t = time.perf_counter()
            barrier.wait(timeout=900)
            rounds.append(time.perf_counter() - t)
        fits = [queue.get(timeout=60) for _ in range(args.clients * args.rounds)]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    return {"startup": startup, "rounds": rounds, "fits": fits,
            "wall": time.perf_counter() - t0}


# --------------------------------------------------------------------------- flwr side
class CheckpointWatch(threading.Thread):
    """Polls ``<run>/checkpoint.json``; remembers the file's mtime for each round seen."""

    def __init__(self, run_dir: Path, period: float = 0.02):
        super().__init__(daemon=True)
        self.path = run_dir / "checkpoint.json"
        self.period = period
        self.mtimes: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        last = None
        while not self.stop.is_set():
            try:
                st = self.path.stat()
                if st.st_mtime_ns != last:
                    rnd = int(json.loads(self.path.read_text())["round"])
                    self.mtimes.setdefault(rnd, st.st_mtime)
                    last = st.st_mtime_ns
            except (OSError, ValueError, KeyError):
                pass  # not written yet, or caught mid-replace
            time.sleep(self.period)


def run_flower(args: argparse.Namespace, overrides: dict, out_dir: Path, name: str) -> dict:
    watch = CheckpointWatch(out_dir / name)
    watch.start()
    try:
        _, wall = C.run_flwr(overrides, num_supernodes=args.clients, num_cpus=1,
                             log_path=out_dir / f"{name}.log")
    finally:
        watch.stop.set()
        watch.join()
    recs = sorted(C.read_metrics(out_dir, name), key=lambda r: r["round"])
    rounds = [r["round_time_s"] for r in recs if r["round"] > 0]
    m = watch.mtimes
    full = [m[r] - m[r - 1] for r in range(2, args.rounds + 1) if r in m and r - 1 in m]
    comm = out_dir / name / "communication.json"
    return {"rounds": rounds, "wall": wall, "startup": wall - sum(rounds),
            "full_rounds": full,
            "server_eval": [r.get("server_eval_time_s", 0.0) for r in recs if r["round"] > 0],
            "finish": (comm.stat().st_mtime - m[args.rounds]) if comm.exists()
            and args.rounds in m else float("nan"),
            "bytes_up_per_client": recs[-1].get("bytes_up_per_client", float("nan"))}


def summary_rows(d: dict) -> list[tuple[str, str]]:
    """The README row, from the figures this script writes to ``homo_overhead.json``."""
    lo, mid, hi = C.spread(d["ratio"])
    flo, fmid, fhi = C.spread(d["ratio_full"])
    loads = d.get("loads") or []
    load = f"; 1-min load median {C.median(loads):.1f} on 2 cores" if loads else ""
    return [(
        "Flower simulation round vs the same training in plain torch",
        f"training only **{mid:.2f}x** (min {lo:.2f}, max {hi:.2f}; "
        f"{C.median(d['flwr_round_s']):.1f} s vs {C.median(d['plain_round_s']):.1f} s a "
        f"round, {d['clients']} clients x {d['local_steps']} steps; target <= {TARGET}x"
        f"{'; below 1x: within the noise of the loaded box' if lo < 1 else ''}); "
        f"everything a round costs the user with the default config (server evaluation, "
        f"saving the adapter, checkpoint) **{fmid:.2f}x** plain training (min {flo:.2f}, "
        f"max {fhi:.2f}; {C.median(d['flwr_full_round_s']):.1f} s a round). "
        f"{d['repeats']} interleaved repetitions{load}")]


def main() -> None:
    args = parse_args()
    if args.rounds < 2:
        raise SystemExit("--rounds must be >= 2 (round 1 is warm-up)")
    model_ref = C.resolve_model_arg(args.model)
    out_dir = Path(tempfile.mkdtemp(prefix="fatellm-bench-overhead-"))
    t_start = time.perf_counter()
    bench = C.Interleaved({
        "plain": lambda rep: run_plain(args, overrides_for(args, model_ref, out_dir,
                                                           f"plain{rep}")),
        "flwr": lambda rep: run_flower(args, overrides_for(args, model_ref, out_dir,
                                                           f"flwr{rep}"), out_dir, f"flwr{rep}"),
        "flwr-full": lambda rep: run_flower(args, full_overrides(args, model_ref, out_dir,
                                                                 f"full{rep}"),
                                            out_dir, f"full{rep}"),
    }).run(args.repeats)
    plain, flower, full = (bench.values(a) for a in ("plain", "flwr", "flwr-full"))

    def steady(run: dict, key: str = "rounds") -> float:
        xs = run[key][1:] if key == "rounds" else run[key]
        return C.median(xs)

    # per repetition: median steady round of each arm, and the paired ratios
    p_rep = [steady(r) for r in plain]
    f_rep = [steady(r) for r in flower]
    full_rep = [steady(r, "full_rounds") for r in full]
    ratio = [f / p for f, p in zip(f_rep, p_rep)]
    ratio_full = [f / p for f, p in zip(full_rep, p_rep)]
    p_fit = [fit for r in plain for (_, rnd, fit) in r["fits"] if rnd > 1]

    def row(label: str, xs: list[float]) -> list:
        lo, mid, hi = C.spread(xs)
        return [label, round(mid, 3), round(lo, 3), round(hi, 3)]

    rows = [
        row("plain torch: training round (s)", p_rep),
        row("Flower, training only (`round_time_s`, eval + saving off) (s)", f_rep),
        row("Flower as a user runs it: whole round incl. server eval, saving the adapter, "
            "checkpoint (s)", full_rep),
        row("  of which server evaluation (s)", [C.median(r["server_eval"][1:]) for r in full]),
        row("**ratio: Flower training only / plain**", ratio),
        row("**ratio: Flower whole round / plain training**", ratio_full),
        row("round 1, plain (s)", [r["rounds"][0] for r in plain]),
        row("round 1, Flower training only (incl. actors loading model + data) (s)",
            [r["rounds"][0] for r in flower]),
        row("startup, plain: processes load model + data (s)", [r["startup"] for r in plain]),
        row("startup + shutdown, Flower: wall - rounds (SuperLink, Ray, ServerApp) (s)",
            [r["startup"] for r in flower]),
        row("after the last checkpoint, Flower as a user runs it: final adapter, plots, "
            "summary (s)", [r["finish"] for r in full]),
        row("whole run wall, plain (s)", [r["wall"] for r in plain]),
        row("whole run wall, Flower training only (s)", [r["wall"] for r in flower]),
        row("whole run wall, Flower as a user runs it (s)", [r["wall"] for r in full]),
    ]
    table = C.markdown_table(["measure (rounds 2..R unless said)", "median", "min", "max"],
                             rows)
    per_rep = C.markdown_table(
        ["rep", "plain round times (s)", "flwr round_time_s (s)",
         "flwr-full whole rounds 2..R (s)", "flwr / plain", "flwr-full / plain"],
        [[i, ", ".join(f"{x:.2f}" for x in p["rounds"]),
          ", ".join(f"{x:.2f}" for x in f["rounds"]),
          ", ".join(f"{x:.2f}" for x in u["full_rounds"]), f"{a:.3f}", f"{b:.3f}"]
         for i, (p, f, u, a, b) in enumerate(zip(plain, flower, full, ratio, ratio_full))])
    mid = C.median(ratio)
    verdict = "meets" if mid <= TARGET else "MISSES"
    body = (
        f"Model `{args.model}`, {args.peft_method}, {args.clients} clients in parallel with 1 "
        f"CPU / 1 torch thread each, {args.local_steps} local steps x batch "
        f"{args.batch_size} x max length {args.max_length} per round, {args.rounds} rounds "
        f"per run, {args.repeats} interleaved repetitions (plain, flwr, flwr-full, ...); "
        f"server test set {args.test_size} examples. Payload per client-round: "
        f"{flower[-1]['bytes_up_per_client']:,.0f} bytes each way. Each figure: the median "
        f"steady round of one repetition; min / median / max over repetitions; ratios pair "
        f"the repetitions.\n\n{table}\n\n"
        f"**Steady-state overhead, training only: {mid:.3f}x** (min {min(ratio):.3f}, max "
        f"{max(ratio):.3f}; target <= {TARGET}x: {verdict}). **Everything a round costs "
        f"the user (evaluation + saving + checkpoint) vs plain training: "
        f"{C.median(ratio_full):.3f}x** (min {min(ratio_full):.3f}, max "
        f"{max(ratio_full):.3f}).\n\nPer repetition:\n\n{per_rep}\n\n"
        f"Plain per-client fit time (the child's own timing, rounds 2..R): median "
        f"{C.median(p_fit):.3f} s over {len(p_fit)} fits.\n\n{bench.load_note()}")
    notes = [
        "Fairness: the simulation gives each client 1 CPU (`client-resources-num-cpus=1`) "
        "and `client_app` sets 1 torch thread, so on 2 cores 2 clients train in parallel. "
        "The plain side reproduces exactly that (N processes, 1 thread each, started "
        "together each round), rather than one process with 2 threads.",
        "flwr `round_time_s` spans configure_fit -> client fits (in Ray actors) -> "
        "serialisation -> aggregate_fit -> (server eval is off). It includes Flower's "
        "per-message ClientApp construction (`client_fn`, cached model/data) and the "
        "FedAvg of the adapters; the plain side has no aggregation.",
        "flwr-full's whole round = time between the checkpoint writes of rounds r-1 and r: "
        "the next round's configure_fit, fits, aggregation, server evaluation of the new "
        "global adapter (the app default `server-eval=true`), saving `round-XXX/` "
        "(`save-every-round=true`) and the checkpoint. The plain side does none of these "
        "(it trains only), so this ratio is what the user pays per round over bare "
        "training, not Flower's overhead alone.",
        "Round 1 on the Flower side includes the actors' model load and tokenization "
        "(the plain side does those before its first barrier), so it is excluded from the "
        "ratio and shown separately.",
        f"Took {time.perf_counter() - t_start:.0f}s in all.",
    ]
    write = not args.model.startswith("tiny")  # a tiny check prints only
    data = {"model": args.model, "repeats": args.repeats, "clients": args.clients,
            "local_steps": args.local_steps,
            "plain_round_s": p_rep, "flwr_round_s": f_rep, "flwr_full_round_s": full_rep,
            "ratio": ratio, "ratio_full": ratio_full, "loads": bench.loads}
    C.emit("homo_overhead", "Flower overhead per round: simulation vs plain torch", body,
           C.command_line(), notes, write=write, summary=summary_rows(data))
    if write:
        (C.RESULTS / "homo_overhead.json").write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
