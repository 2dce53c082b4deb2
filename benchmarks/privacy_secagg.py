"""SecAgg+ vs plain FedAvg: round time (ratio) and the aggregate's max abs error.

Each arm is a real ``flwr run .`` simulation (``_common.run_flwr``: private FLWR_HOME, free
ports, the detached local SuperLink stopped afterwards) with the same setup, FedHomoLLM
(LoRA), ``--clients`` SuperNodes, ``--rounds`` rounds, ``server-eval=false``, iid split of a
small generated classification jsonl (or BBC News with ``--dataset``):

- ``plain``: FedAvg (the strategy sees every client's adapter);
- ``secagg``: ``secure-aggregation=true`` -> ``server_app`` runs Flower's
  ``SecAggPlusWorkflow``; clients send deltas (``mods.delta_mod``), masked by
  ``secaggplus_mod``; ``secagg-max-weight`` = the largest client's example count;
- ``secagg-default`` (first repetition only, ``--no-default-weight`` to skip): same with the
  default ``secagg-max-weight`` (1000).

Round time is ``round_time_s`` from each run's metrics.json (configure_fit -> aggregation);
round 1 (Ray actors load the model and data) is reported apart and the ratio uses rounds
2..R. Repetitions are interleaved (plain, secagg, then secagg, plain, ...), medians
reported. The error is the max abs difference of the saved round-N adapters
(``round-00N/adapter_model.safetensors``) of SecAgg+ vs plain in the same repetition.

Example::

    python benchmarks/privacy_secagg.py                                    # tiny model
    python benchmarks/privacy_secagg.py --model builtin:smollm2-135m-instruct --max-length 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _common as C

NAME = "privacy_secagg"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="'tiny' (tiny random Llama, fatellm_flwr.testing) or a model ref, e.g. "
                        "builtin:smollm2-135m-instruct")
    p.add_argument("--dataset", default="",
                   help="dataset ref (default: a generated 3-topic jsonl of --rows rows)")
    p.add_argument("--rows", type=int, default=150)
    p.add_argument("--test-size", type=int, default=15)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--repeats", type=int, default=3, help="interleaved (plain, secagg) pairs")
    p.add_argument("--no-default-weight", action="store_true",
                   help="skip the extra SecAgg+ run with the default secagg-max-weight")
    p.add_argument("--client-cpus", type=float, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--work-dir", default="")
    return p.parse_args()


def write_jsonl(path: Path, rows: int, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    topics = {"sport": "the team won the match", "business": "shares rose in trading",
              "tech": "a new phone was released"}
    with path.open("w") as f:
        for i in range(rows):
            label = list(topics)[i % 3]
            f.write(json.dumps({"text": f"{topics[label]} {rng.integers(1000)}",
                                "label": label}) + "\n")


def load_adapter(run: Path, rnd: int) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(run / f"round-{rnd:03d}" / "adapter_model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    import numpy as np

    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))))
               for k in a)


def main() -> None:
    args = parse_args()
    t_start = time.perf_counter()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fatellm-bench-privacy-secagg-"))
    work.mkdir(parents=True, exist_ok=True)
    model_ref = C.resolve_model_arg(args.model)
    dataset = args.dataset
    if not dataset:
        dataset = str(work / "topics.jsonl")
        write_jsonl(Path(dataset), args.rows, args.seed)

    base = {
        "algorithm": "homo", "model": model_ref, "dataset": dataset, "peft-method": "lora",
        "num-server-rounds": args.rounds, "local-steps": args.local_steps,
        "local-epochs": 0.0, "batch-size": args.batch_size, "grad-accum": 1,
        "max-length": args.max_length, "max-examples": 0, "test-size": args.test_size,
        "partitioner": "iid", "lr": args.lr, "seed": args.seed, "aggregator": "fedavg",
        "fraction-fit": 1.0, "min-fit-clients": args.clients,
        "min-available-clients": args.clients, "fraction-evaluate": 0.0,
        "server-eval": False, "plots": False, "save-every-round": True,
        "client-dp": "none", "dp-sgd": False, "output-dir": str(work),
    }
    cfg = C.app_config(base)

    # clients' example counts (what each sends as its FedAvg weight), from the package's split
    from fatellm_flwr.data import federated_data

    fed = federated_data(cfg, args.clients)
    counts = [len(fed.client_split(pid, cfg.val_fraction, cfg.seed)[0])
              for pid in range(args.clients)]
    tuned_weight = float(max(counts))
    default_weight = float(C.pyproject_app_config().get("secagg-max-weight", 1000.0))

    arms = {"plain": {"secure-aggregation": False},
            "secagg": {"secure-aggregation": True, "secagg-max-weight": tuned_weight},
            "secagg-default": {"secure-aggregation": True,
                               "secagg-max-weight": default_weight}}
    schedule: list[tuple[int, str]] = []
    for rep in range(args.repeats):
        pair = ["plain", "secagg"] if rep % 2 == 0 else ["secagg", "plain"]
        schedule += [(rep, a) for a in pair]
        if rep == 0 and not args.no_default_weight:
            schedule.append((rep, "secagg-default"))

    runs: dict[tuple[int, str], dict] = {}
    for rep, arm in schedule:
        name = f"{arm}-rep{rep}"
        over = {**base, **arms[arm], "run-name": name}
        C.app_config(over)
        print(f"[secagg] {name}: flwr run . ...", flush=True)
        out, wall = C.run_flwr(over, num_supernodes=args.clients, num_cpus=args.client_cpus,
                               log_path=work / f"{name}.log")
        if arm != "plain" and "Secure aggregation: SecAgg+" not in out:
            raise RuntimeError(f"{name}: the SecAgg+ workflow did not run (see its log)")
        recs = [r for r in C.read_metrics(work, name) if r["round"] > 0]
        short = [r["round"] for r in recs if r.get("clients_ok") != args.clients]
        if short:  # e.g. Ray killed an actor when the shared box ran low on memory
            raise RuntimeError(f"{name}: rounds {short} aggregated fewer than {args.clients} "
                               f"clients (see {work / (name + '.log')}); the comparison would "
                               "be meaningless, rerun when the box has more free memory")
        runs[(rep, arm)] = {"wall": wall, "recs": recs, "path": work / name}
        print(f"[secagg] {name}: {wall:.0f}s wall, round_time_s "
              f"{[round(r.get('round_time_s', float('nan')), 3) for r in recs]}, "
              f"updates seen {[r.get('distinct_updates_seen') for r in recs]}", flush=True)

    # ---------------------------------------------------------------- timing
    def times(arm: str, first: bool) -> list[float]:
        out = []
        for (_rep, a), run in runs.items():
            if a == arm:
                out += [r["round_time_s"] for r in run["recs"]
                        if (r["round"] == 1) == first and "round_time_s" in r]
        return out

    present = [a for a in arms if any(a == k[1] for k in runs)]
    t_rows = []
    for arm in present:
        steady, first = times(arm, False), times(arm, True)
        walls = [run["wall"] for (_, a), run in runs.items() if a == arm]
        seen = sorted({r.get("distinct_updates_seen") for (_, a), run in runs.items()
                       if a == arm for r in run["recs"]})
        t_rows.append([arm, len(walls), C.median(steady), min(steady) if steady else "",
                       C.median(steady) / C.median(times("plain", False)),
                       C.median(first), C.median(first) / C.median(times("plain", True)),
                       C.median(walls), ", ".join(str(s) for s in seen)])
    # per-repetition ratio (runs next to each other in time)
    rep_ratios = []
    for rep in range(args.repeats):
        if (rep, "plain") in runs and (rep, "secagg") in runs:
            p = C.median([r["round_time_s"] for r in runs[(rep, "plain")]["recs"]
                          if r["round"] > 1])
            s = C.median([r["round_time_s"] for r in runs[(rep, "secagg")]["recs"]
                          if r["round"] > 1])
            rep_ratios.append(s / p)
    time_table = C.markdown_table(
        ["arm", "runs", f"round time, rounds 2..{args.rounds} (s), median", "min",
         "/ plain (medians)", "round 1 (s), median (incl. actor warm-up)", "round 1 / plain",
         "flwr run wall (s), median", "distinct updates the strategy saw per round"], t_rows)

    # ---------------------------------------------------------------- error
    import numpy as np

    from fatellm_flwr.models import get_trainable_state, load_peft_model, trainable_names

    model, _ = load_peft_model(cfg)  # same seed -> the run's initial global adapter
    init_state = dict(zip(trainable_names(model), get_trainable_state(model)))
    e_rows = []
    for rnd in range(1, args.rounds + 1):
        plain = load_adapter(runs[(0, "plain")]["path"], rnd)
        prev = load_adapter(runs[(0, "plain")]["path"], rnd - 1) if rnd > 1 else None
        if prev is None:  # round 1: vs the initial adapter (PEFT drops ".default" on save)
            prev = {k.replace(".default", ""): v for k, v in init_state.items()}
        upd = max_abs_diff(plain, prev) if set(prev) >= set(plain) else float("nan")
        row = [rnd, upd,
               max(float(np.max(np.abs(v))) for v in plain.values())]
        for arm in ("secagg", "secagg-default"):
            row.append(max_abs_diff(plain, load_adapter(runs[(0, arm)]["path"], rnd))
                       if (0, arm) in runs else "")
        row.append(max_abs_diff(plain, load_adapter(runs[(1, "plain")]["path"], rnd))
                   if (1, "plain") in runs else "")
        e_rows.append(row)
    err_table = C.markdown_table(
        ["round", "max abs global update this round (plain)", "max abs adapter value (plain)",
         f"SecAgg+ (max-weight {tuned_weight:g}) vs plain: max abs diff",
         f"SecAgg+ (max-weight {default_weight:g}, default) vs plain: max abs diff",
         "plain rep 0 vs plain rep 1 (determinism floor)"], e_rows)

    clip = cfg.secagg_clipping_range
    levels = cfg.secagg_quantization_range
    total = sum(counts)

    def agg_step(m: float) -> float:  # one quantization step of the aggregate
        return 2 * clip / levels * m / total

    body = "\n\n".join([
        f"Model `{args.model}`, dataset "
        f"`{args.dataset or f'generated 3-topic jsonl, {args.rows} rows'}`"
        f" ({args.test_size} held out, iid over {args.clients} clients; training examples per "
        f"client {counts}), LoRA, {args.rounds} rounds x {args.local_steps} local steps x batch "
        f"{args.batch_size}, max length {args.max_length}, lr {args.lr}, server-eval off, "
        f"{args.clients} SuperNodes with {args.client_cpus} CPU each. SecAgg+: "
        f"{cfg.secagg_num_shares:g} shares, threshold {cfg.secagg_reconstruction_threshold:g}, "
        f"clipping range {clip:g}, {levels:,} quantization levels, updates sent as deltas.",
        f"**Round time** ({args.repeats} interleaved repetitions; per-repetition SecAgg+/plain "
        f"ratio of rounds 2..{args.rounds}: "
        + ", ".join(f"{r:.3f}" for r in rep_ratios)
        + f"; min / median / max {C.spread(rep_ratios)[0]:.3f} / {C.spread(rep_ratios)[1]:.3f}"
        f" / {C.spread(rep_ratios)[2]:.3f}; 1-min load {C.load_avg()}):",
        time_table,
        "**Error of the SecAgg+ aggregate** (repetition 0; round-N adapters from "
        "`save-every-round`):",
        err_table,
        f"Quantization step of the aggregate, 2 x clip x max-weight / (levels x total "
        f"weight): {agg_step(tuned_weight):.3g} with max-weight {tuned_weight:g}, "
        f"{agg_step(default_weight):.3g} with {default_weight:g} (total weight {total}); "
        "Flower rounds stochastically, so each client adds at most one step.",
    ])
    notes = [
        "`round_time_s` spans configure_fit -> client fits -> (SecAgg+: its 4 stages: key "
        "setup, share keys, collect masked vectors, unmask) -> aggregate_fit; server eval is "
        "off so it is training + protocol + aggregation.",
        "Errors after round 1 compound: later rounds start from slightly different global "
        "adapters, so clients' local training diverges a little; round 1 is the pure "
        "aggregation error. Plain FedAvg is deterministic here (fixed per-round client seeds), "
        "as the last column shows when there are >= 2 repetitions.",
        f"Took {time.perf_counter() - t_start:.0f}s in all; outputs and logs in {work}.",
    ]
    lo, mid, hi = C.spread(rep_ratios)
    err1 = e_rows[0][3] if e_rows and e_rows[0][3] != "" else float("nan")
    err1_default = e_rows[0][4] if e_rows and e_rows[0][4] != "" else float("nan")
    summary = [(
        f"SecAgg+ round vs plain FedAvg ({args.model}, {args.clients} clients)",
        f"**{mid:.2f}x** round time, rounds 2-{args.rounds} (min {lo:.2f}, max {hi:.2f} over "
        f"{len(rep_ratios)} interleaved repetitions); aggregate max abs error vs FedAvg "
        f"**{err1:.2g}** in round 1 with `secagg-max-weight` = largest client's examples, "
        f"{err1_default:.2g} with the default {default_weight:g}")]
    C.emit(NAME, "SecAgg+ vs plain FedAvg: round time and aggregation error", body,
           C.command_line(), notes, summary=summary)


if __name__ == "__main__":
    main()
