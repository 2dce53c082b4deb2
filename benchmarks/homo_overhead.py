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

Round 1 is reported separately on both sides (the Flower actors load the model and
tokenize their partition inside round 1; the plain processes warm up), so the overhead
ratio uses rounds 2..R. Repetitions are interleaved (plain, flwr, plain, flwr, ...), and
medians reported.

Example (a few minutes on 2 CPU cores)::

    python benchmarks/homo_overhead.py
    python benchmarks/homo_overhead.py --model tiny    # quick check with a tiny random model
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
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
    p.add_argument("--repeats", type=int, default=2,
                   help="interleaved repetitions of (plain, flwr)")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args()


def overrides_for(args: argparse.Namespace, model_ref: str, out_dir: Path,
                  run_name: str) -> dict:
    return {
        "algorithm": "homo", "model": model_ref, "dataset": "builtin:bbc-news",
        "peft-method": args.peft_method, "num-server-rounds": args.rounds,
        "local-steps": args.local_steps, "local-epochs": 0.0, "batch-size": args.batch_size,
        "grad-accum": 1, "max-length": args.max_length, "max-examples": args.max_examples,
        "test-size": 20, "partitioner": "iid", "seed": args.seed, "aggregator": "fedavg",
        "fraction-fit": 1.0, "min-fit-clients": args.clients,
        "min-available-clients": args.clients, "fraction-evaluate": 0.0,
        "server-eval": False, "plots": False, "save-every-round": False,
        "output-dir": str(out_dir), "run-name": run_name,
    }


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
def run_flower(args: argparse.Namespace, overrides: dict, out_dir: Path, name: str) -> dict:
    _, wall = C.run_flwr(overrides, num_supernodes=args.clients, num_cpus=1,
                         log_path=out_dir / f"{name}.log")
    recs = C.read_metrics(out_dir, name)
    rounds = [r["round_time_s"] for r in sorted(recs, key=lambda r: r["round"])
              if r["round"] > 0]
    return {"rounds": rounds, "wall": wall, "startup": wall - sum(rounds),
            "bytes_up_per_client": recs[-1].get("bytes_up_per_client", float("nan"))}


def main() -> None:
    args = parse_args()
    if args.rounds < 2:
        raise SystemExit("--rounds must be >= 2 (round 1 is warm-up)")
    model_ref = C.resolve_model_arg(args.model)
    out_dir = Path(tempfile.mkdtemp(prefix="fatellm-bench-overhead-"))
    t_start = time.perf_counter()
    plain, flower = [], []
    for rep in range(args.repeats):
        p = run_plain(args, overrides_for(args, model_ref, out_dir, f"plain{rep}"))
        plain.append(p)
        print(f"[overhead] rep {rep} plain rounds {[round(x, 2) for x in p['rounds']]}",
              flush=True)
        f = run_flower(args, overrides_for(args, model_ref, out_dir, f"flwr{rep}"), out_dir,
                       f"flwr{rep}")
        flower.append(f)
        print(f"[overhead] rep {rep} flwr rounds {[round(x, 2) for x in f['rounds']]}",
              flush=True)

    p_steady = [x for r in plain for x in r["rounds"][1:]]
    f_steady = [x for r in flower for x in r["rounds"][1:]]
    p_fit = [fit for r in plain for (_, rnd, fit) in r["fits"] if rnd > 1]
    ratio = C.median(f_steady) / C.median(p_steady)
    rows = [
        ["round time, rounds 2..R (s), median", C.median(p_steady), C.median(f_steady),
         f"{ratio:.3f}"],
        ["round time, rounds 2..R (s), min", min(p_steady), min(f_steady),
         f"{min(f_steady) / min(p_steady):.3f}"],
        ["round 1 (s), median (flwr: incl. actors loading model + data)",
         C.median([r["rounds"][0] for r in plain]), C.median([r["rounds"][0] for r in flower]),
         "-"],
        ["startup (s), median (plain: processes load model + data; flwr: wall - rounds, "
         "SuperLink + Ray + ServerApp + shutdown)",
         C.median([r["startup"] for r in plain]), C.median([r["startup"] for r in flower]),
         "-"],
        ["whole run wall (s), median", C.median([r["wall"] for r in plain]),
         C.median([r["wall"] for r in flower]), "-"],
    ]
    table = C.markdown_table(["measure", "plain torch", "Flower simulation", "flwr / plain"],
                             [[a, round(b, 3), round(c, 3), d] for a, b, c, d in rows])
    per_rep = C.markdown_table(
        ["rep", "plain round times (s)", "flwr round_time_s (s)",
         "steady flwr/plain (median)"],
        [[i, ", ".join(f"{x:.2f}" for x in p["rounds"]),
          ", ".join(f"{x:.2f}" for x in f["rounds"]),
          f"{C.median(f['rounds'][1:]) / C.median(p['rounds'][1:]):.3f}"]
         for i, (p, f) in enumerate(zip(plain, flower))])
    verdict = "meets" if ratio <= TARGET else "MISSES"
    body = (
        f"Model `{args.model}`, {args.peft_method}, {args.clients} clients in parallel with 1 "
        f"CPU / 1 torch thread each, {args.local_steps} local steps x batch "
        f"{args.batch_size} x max length {args.max_length} per round, {args.rounds} rounds "
        f"per run, {args.repeats} interleaved repetitions (plain, flwr, ...). Payload per "
        f"client-round: {flower[-1]['bytes_up_per_client']:,.0f} bytes each way.\n\n"
        f"{table}\n\n**Steady-state overhead: {ratio:.3f}x** (target <= {TARGET}x: "
        f"{verdict}).\n\nPer repetition:\n\n{per_rep}\n\n"
        f"Plain per-client fit time (the child's own timing, rounds 2..R): median "
        f"{C.median(p_fit):.3f} s over {len(p_fit)} fits.")
    notes = [
        "Fairness: the simulation gives each client 1 CPU (`client-resources-num-cpus=1`) "
        "and `client_app` sets 1 torch thread, so on 2 cores 2 clients train in parallel. "
        "The plain side reproduces exactly that (N processes, 1 thread each, started "
        "together each round), rather than one process with 2 threads.",
        "flwr `round_time_s` spans configure_fit -> client fits (in Ray actors) -> "
        "serialisation -> aggregate_fit -> (server eval is off). It includes Flower's "
        "per-message ClientApp construction (`client_fn`, cached model/data) and the "
        "FedAvg of the adapters; the plain side has no aggregation.",
        "Round 1 on the Flower side includes the actors' model load and tokenization "
        "(the plain side does those before its first barrier), so it is excluded from the "
        "ratio and shown separately.",
        f"Took {time.perf_counter() - t_start:.0f}s in all.",
    ]
    C.emit("homo_overhead", "Flower overhead per round: simulation vs plain torch", body,
           C.command_line(), notes)


if __name__ == "__main__":
    main()
