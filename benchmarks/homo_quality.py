"""Quality of federated LoRA vs local-only vs centralized on BBC News (FedHomoLLM).

FATE-LLM reports "federated ~ centralized > any single client". This script measures it
with the package's real code paths, all scored by ``metrics.evaluate_model`` on the same
held-out test set (``data.split_pool_and_test``):

- zero-shot: the base model (LoRA B=0 at init, so the wrapped model equals the base);
- federated: a real ``flwr run .`` simulation (N SuperNodes, 1 CPU each, Dirichlet
  partitions), final ``server_accuracy`` read from the run's metrics.json;
- local-only: each client trains the same adapter init on its own partition (the exact
  train split ``clients.homo.client_datasets`` gives the HomoClient) for the same rounds
  x local-steps, with the HomoClient's per-round seeds and a fresh AdamW per round,
  but no aggregation;
- centralized: one ``train.train_local`` run on the union of the clients' train splits
  with the same total number of optimizer steps as all clients together
  (rounds x local-steps x clients) and the same batch size.

Example (about 20-25 min on 2 CPU cores)::

    python benchmarks/homo_quality.py
    python benchmarks/homo_quality.py --model tiny --max-examples 200 --test-size 40  # quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common as C


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct",
                   help="model ref, or 'tiny' for a tiny random Llama (quick check only)")
    p.add_argument("--clients", type=int, default=5, help="federated clients / partitions")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds")
    p.add_argument("--local-steps", type=int, default=8, help="optimizer steps per round")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (all arms)")
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--max-examples", type=int, default=800,
                   help="stratified subset of BBC News (2,225 articles)")
    p.add_argument("--test-size", type=int, default=100, help="held-out test set")
    p.add_argument("--dirichlet-alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--centralized-steps", type=int, default=0,
                   help="centralized steps (0 = rounds x local-steps x clients)")
    p.add_argument("--skip", default="", help="comma-separated arms to skip: "
                   "federated,local,centralized")
    p.add_argument("--work-dir", default="", help="where the Flower run writes its outputs "
                   "(default: a temp dir)")
    p.add_argument("--federated-from", default="",
                   help="reuse the federated arm of an earlier run of this script: its "
                   "--work-dir (holding federated/metrics.json and config.json; the config "
                   "must match this run's)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for the in-process arms (0 = torch's default). On a "
                   "heavily shared box 1 thread avoids OpenMP threads spinning while "
                   "descheduled")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    model_ref = C.resolve_model_arg(args.model)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fatellm-bench-quality-"))
    overrides = {
        "algorithm": "homo", "model": model_ref, "dataset": "builtin:bbc-news",
        "peft-method": "lora", "lora-r": 8, "target-modules": "",
        "num-server-rounds": args.rounds, "local-steps": args.local_steps,
        "local-epochs": 0.0, "batch-size": args.batch_size, "grad-accum": 1, "lr": args.lr,
        "max-length": args.max_length, "max-examples": args.max_examples,
        "test-size": args.test_size, "partitioner": "dirichlet",
        "dirichlet-alpha": args.dirichlet_alpha, "seed": args.seed,
        "aggregator": "fedavg", "fraction-fit": 1.0, "min-fit-clients": args.clients,
        "min-available-clients": args.clients, "fraction-evaluate": 0.0,
        "server-eval": True, "eval-metric": "accuracy", "accuracy-by": "likelihood",
        "output-dir": str(work), "run-name": "federated", "plots": False,
        "save-every-round": False,
    }
    cfg = C.app_config(overrides)
    total_steps = args.rounds * args.local_steps * args.clients
    central_steps = args.centralized_steps or total_steps
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    # ---------------------------------------------------------------- federated (Flower)
    fed = None
    if args.federated_from:
        import json

        prev = Path(args.federated_from)
        saved = json.loads((prev / "federated" / "config.json").read_text())
        mine = cfg.to_run_config()
        # keys added to Config since that run (other algorithms' options) are not compared
        diff = {k: (saved[k], v) for k, v in mine.items()
                if k in saved and k not in ("output-dir", "run-name") and saved[k] != v}
        if diff:
            raise SystemExit(f"--federated-from {prev}: config differs: {diff}")
        fed = C.read_metrics(prev, "federated")
        wall_file = prev / "federated_wall_s.txt"
        if wall_file.exists():
            timings["federated (flwr run, wall; earlier invocation)"] = float(
                wall_file.read_text())
        else:
            timings["federated (sum of round_time_s + server eval; earlier invocation)"] = sum(
                r.get("round_time_s", 0.0) + r.get("server_eval_time_s", 0.0) for r in fed)
        print(f"[quality] federated reused from {prev}: "
              f"{[(r['round'], r.get('server_accuracy')) for r in fed]}", flush=True)
    elif "federated" not in skip:
        print(f"[quality] federated: flwr run . ({args.clients} supernodes, 1 CPU each)...",
              flush=True)
        _, wall = C.run_flwr(overrides, num_supernodes=args.clients, num_cpus=1,
                             log_path=work / "federated.log")
        timings["federated (flwr run, wall)"] = wall
        (work / "federated_wall_s.txt").write_text(f"{wall:.1f}")
        fed = C.read_metrics(work, "federated")
        print(f"[quality] federated done in {wall:.0f}s: "
              f"{[(r['round'], r.get('server_accuracy')) for r in fed]}", flush=True)

    # ---------------------------------------------------------------- in-process arms
    import datasets
    import numpy as np
    import torch

    from fatellm_flwr.clients.homo import client_datasets
    from fatellm_flwr.data import label_distribution, split_pool_and_test, tokenize_dataset
    from fatellm_flwr.metrics import evaluate_model
    from fatellm_flwr.models import get_trainable_state, load_peft_model, set_trainable_state
    from fatellm_flwr.train import train_local

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_peft_model(cfg)
    init = get_trainable_state(model)
    task_data, _, test, _ = split_pool_and_test(cfg)
    test_tok = tokenize_dataset(test, tok, cfg, task_data)
    zero = evaluate_model(model, tok, test, test_tok, task_data, cfg)
    timings["zero-shot eval"] = time.perf_counter() - t0
    print(f"[quality] zero-shot accuracy {zero['accuracy']:.3f}", flush=True)

    parts = []
    for pid in range(args.clients):
        _, train, _, _ = client_datasets(cfg, tok, pid, args.clients)
        parts.append(train)
    dists = [label_distribution(p, cfg.label_column) for p in parts]

    def evaluate() -> dict[str, float]:
        return evaluate_model(model, tok, test, test_tok, task_data, cfg)

    local: list[dict[str, float]] = []
    if "local" not in skip:
        t0 = time.perf_counter()
        for pid, train in enumerate(parts):
            set_trainable_state(model, init)
            losses = []
            for rnd in range(1, args.rounds + 1):  # the HomoClient's schedule, no aggregation
                seed = cfg.seed + 1000 * rnd + pid
                torch.manual_seed(seed)
                m = train_local(model, train, cfg, steps=cfg.local_steps,
                                pad_id=tok.pad_token_id, seed=seed, desc=f"local {pid}")
                losses.append(m["train_loss"])
            res = evaluate()
            res["train_loss_last_round"] = losses[-1]
            local.append(res)
            print(f"[quality] local-only client {pid} ({len(train)} ex): "
                  f"accuracy {res['accuracy']:.3f}", flush=True)
        timings["local-only (all clients)"] = time.perf_counter() - t0

    central = None
    if "centralized" not in skip:
        t0 = time.perf_counter()
        pooled = datasets.concatenate_datasets(parts)
        set_trainable_state(model, init)
        torch.manual_seed(cfg.seed)
        m = train_local(model, pooled, cfg, steps=central_steps, pad_id=tok.pad_token_id,
                        seed=cfg.seed, desc="centralized")
        central = evaluate()
        central["train_loss"] = m["train_loss"]
        timings["centralized"] = time.perf_counter() - t0
        print(f"[quality] centralized accuracy {central['accuracy']:.3f}", flush=True)

    # ---------------------------------------------------------------- report
    rows = [["zero-shot (base model)", "-", 0, zero["accuracy"], zero["loss"]]]
    if fed is not None:
        last = fed[-1]
        rows.append([f"federated LoRA (FedAvg, {args.clients} clients, flwr simulation)",
                     f"{args.rounds} rounds x {args.local_steps} steps x {args.clients} clients",
                     total_steps, last.get("server_accuracy", float("nan")),
                     last.get("server_loss", float("nan"))])
    if central is not None:
        rows.append(["centralized LoRA (pooled client train data)", f"{central_steps} steps",
                     central_steps, central["accuracy"], central["loss"]])
    if local:
        accs = [r["accuracy"] for r in local]
        rows.append([f"local-only LoRA, mean of {len(local)} clients",
                     f"{args.rounds} x {args.local_steps} steps each",
                     args.rounds * args.local_steps, float(np.mean(accs)),
                     float(np.mean([r["loss"] for r in local]))])
        rows.append(["local-only LoRA, best client", "", args.rounds * args.local_steps,
                     max(accs), local[int(np.argmax(accs))]["loss"]])
        rows.append(["local-only LoRA, worst client", "", args.rounds * args.local_steps,
                     min(accs), local[int(np.argmin(accs))]["loss"]])
    main_table = C.markdown_table(
        ["arm", "training", "optimizer steps (total)", "test accuracy", "test loss"], rows)

    client_rows = []
    for pid, (train, dist) in enumerate(zip(parts, dists)):
        acc = local[pid]["accuracy"] if local else float("nan")
        client_rows.append([pid, len(train), ", ".join(f"{k}:{v}" for k, v in
                                                      sorted(dist.items())), acc])
    client_table = C.markdown_table(
        ["client", "train examples", "label counts", "local-only test accuracy"], client_rows)

    fed_table = ""
    if fed is not None:
        fed_table = C.markdown_table(
            ["round", "server accuracy", "server loss", "mean client train loss",
             "round time (s)"],
            [[r["round"], r.get("server_accuracy", float("nan")),
              r.get("server_loss", float("nan")), r.get("fit_train_loss", float("nan")),
              r.get("round_time_s", float("nan"))] for r in fed])
    time_table = C.markdown_table(["phase", "seconds"],
                                  [[k, round(v, 1)] for k, v in timings.items()] +
                                  [["total", round(time.perf_counter() - t_start, 1)]])
    n_pool = sum(len(p) for p in parts)
    body = "\n\n".join(x for x in [
        f"Model `{args.model}`, BBC News (`builtin:bbc-news`): {args.max_examples} of 2,225 "
        f"articles (stratified), {len(test)} held out for testing, the rest Dirichlet("
        f"alpha={args.dirichlet_alpha})-partitioned over {args.clients} clients, each keeping "
        f"90% for training ({n_pool} training examples in all). LoRA r=8 on all linear "
        f"layers, batch {args.batch_size}, max length {args.max_length}, lr {args.lr}. "
        "Accuracy = the label whose first token is most likely after the prompt "
        "(`metrics.evaluate_model`, 5 labels, chance 0.2).",
        main_table, "Per-client partitions:", client_table,
        "Federated run, per round (metrics.json):" if fed_table else "", fed_table,
        "Durations:", time_table] if x)
    notes = [
        "Federated accuracy is the final round's `server_accuracy` from the Flower run's "
        "metrics.json; the other arms are scored in this process with the same "
        "`evaluate_model` on the same test set."
        + (f" Flower's round-0 (zero-shot) accuracy was {fed[0].get('server_accuracy'):.4f}"
           f" vs {zero['accuracy']:.4f} here." if fed else ""),
        "Local-only clients replay the HomoClient's exact schedule (same seeds, a new AdamW "
        "every round) without aggregation; centralized is one AdamW run over the pooled data "
        "with the same total optimizer steps as the whole federation.",
        *([f"The federated arm was reused from an earlier invocation of this script "
           f"(`--federated-from {args.federated_from}`; its saved run config was checked "
           "key by key against this one)."] if args.federated_from else []),
        *([f"In-process arms ran with torch.set_num_threads({args.threads})."]
          if args.threads else []),
        f"One seed, one split and a {len(test)}-example test set: differences of a few "
        f"points are within noise (binomial s.e. at p=0.8 is "
        f"{(0.8 * 0.2 / max(1, len(test))) ** 0.5:.3f}).",
    ]
    C.emit("homo_quality", "FedHomoLLM quality: federated vs centralized vs local-only",
           body, C.command_line(), notes)


if __name__ == "__main__":
    main()
