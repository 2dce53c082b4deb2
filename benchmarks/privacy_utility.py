"""Utility vs privacy: FedHomoLLM server accuracy at sample-level epsilon = inf, 8, 3, 1.

Every arm is a real ``flwr run .`` simulation (``_common.run_flwr``: private FLWR_HOME, free
ports, the detached local SuperLink stopped afterwards) with the same federated setup; only
the client training differs:

- ``inf``: plain local training (``train.train_local``: AdamW, batch clipping 1.0);
- ``eps``: ``dp-sgd=true dp-target-epsilon=eps`` -> ``train.train_local_dp`` ->
  ``privacy.dp.attach_dp_sgd`` (Opacus, Poisson sampling of expected batch ``batch-size``,
  per-sample clipping ``dp-max-grad-norm``). The noise multiplier is derived once for the
  planned ``num-server-rounds x local-steps`` steps at sample rate ``batch / n_client``, so
  each client's *sample-level* epsilon after the last round is <= eps (delta
  ``dp-delta``). There is no client-level DP here (``client-dp=none``).

Accuracy is the server's ``server_accuracy`` (``metrics.evaluate_model``: the label whose
first token is most likely after the prompt; BBC News, 5 labels, chance 0.2) on the held-out
test set after the last round; round 0 is the zero-shot base model.

The arms run one after the other; the results file is rewritten after each arm, so an
interrupted run still leaves the finished arms.

Example (SmolLM2-135M, several minutes per arm on 2 shared CPU cores)::

    python benchmarks/privacy_utility.py
    python benchmarks/privacy_utility.py --model tiny --max-examples 60 --test-size 10 \\
        --local-steps 2 --max-length 48            # quick check of the pipeline only
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import _common as C

NAME = "privacy_utility"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct",
                   help="model ref, or 'tiny' for a tiny random Llama (pipeline check only)")
    p.add_argument("--epsilons", default="inf,8,3,1",
                   help="comma-separated sample-level target epsilons; 'inf' = no DP-SGD")
    p.add_argument("--clip-only", action="store_true",
                   help="add an arm with DP-SGD at noise multiplier ~0 (per-sample clipping "
                        "only; epsilon = inf) to separate clipping from noise")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-examples", type=int, default=300)
    p.add_argument("--test-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--partitioner", default="dirichlet", choices=("iid", "dirichlet"))
    p.add_argument("--dirichlet-alpha", type=float, default=0.5)
    p.add_argument("--dp-delta", type=float, default=1e-5)
    p.add_argument("--dp-max-grad-norm", type=float, default=1.0)
    p.add_argument("--client-cpus", type=float, default=1,
                   help="client-resources-num-cpus (1 -> 2 clients train at a time on 2 cores)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--work-dir", default="",
                   help="folder for the runs' outputs and logs (default: a temp dir)")
    p.add_argument("--eval", default="final", choices=("final", "server"),
                   help="final: server-eval=false in the runs, then the final global adapter "
                        "(the run's checkpoint) and the zero-shot base model are scored once "
                        "each in this process with the server's own `evaluate_model` on the "
                        "same test set (saves 3 of 4 evaluations per run); server: "
                        "server-eval=true, accuracy of every round from metrics.json")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild the report from --work-dir/results.json (the "
                        "other options must match the ones of that run)")
    return p.parse_args()


def overrides_for(args: argparse.Namespace, model_ref: str, work: Path, run_name: str,
                  eps: float | None, clip_only: bool = False) -> dict:
    cfg = {
        "algorithm": "homo", "model": model_ref, "dataset": "builtin:bbc-news",
        "peft-method": "lora", "lora-dropout": 0.0, "num-server-rounds": args.rounds,
        "local-steps": args.local_steps, "local-epochs": 0.0, "batch-size": args.batch_size,
        "grad-accum": 1, "max-length": args.max_length, "max-examples": args.max_examples,
        "test-size": args.test_size, "partitioner": args.partitioner,
        "dirichlet-alpha": args.dirichlet_alpha, "lr": args.lr, "seed": args.seed,
        "aggregator": "fedavg", "fraction-fit": 1.0, "min-fit-clients": args.clients,
        "min-available-clients": args.clients, "fraction-evaluate": 0.0,
        "server-eval": args.eval == "server", "plots": False, "save-every-round": False,
        "client-dp": "none", "secure-aggregation": False,
        "dp-delta": args.dp_delta, "dp-max-grad-norm": args.dp_max_grad_norm,
        "output-dir": str(work), "run-name": run_name,
    }
    if clip_only:
        cfg.update({"dp-sgd": True, "dp-noise-multiplier": 1e-9, "dp-target-epsilon": 0.0})
    elif eps is None:
        cfg.update({"dp-sgd": False})
    else:
        cfg.update({"dp-sgd": True, "dp-target-epsilon": float(eps),
                    "dp-noise-multiplier": 0.0})
    C.app_config(cfg)  # validate with the package's own Config before starting Flower
    return cfg


def arm_label(eps: float | None, clip_only: bool) -> str:
    if clip_only:
        return "DP-SGD, noise ~0 (clipping only)"
    return "no DP" if eps is None else f"DP-SGD, target eps {eps:g}"


def main() -> None:
    args = parse_args()
    t_start = time.perf_counter()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fatellm-bench-privacy-utility-"))
    work.mkdir(parents=True, exist_ok=True)
    model_ref = C.resolve_model_arg(args.model)
    arms: list[tuple[float | None, bool]] = []
    for tok in args.epsilons.split(","):
        tok = tok.strip().lower()
        if tok:
            arms.append((None if tok in ("inf", "none") else float(tok), False))
    if args.clip_only:
        arms.insert(1, (None, True))

    results: list[dict] = []
    if args.report_only:
        saved = json.loads((work / "results.json").read_text())
        for res in saved:
            res["wall_s"] = float(res["wall_s"]) if "wall_s" in res else None
            if res.get("records") is None:
                res.pop("records", None)
        command = (saved[0].get("command") if saved else None) or \
            C.command_line().replace(" --report-only", "")
        report(args, saved, arms, work, t_start, command=command)
        return
    for eps, clip_only in arms:
        name = "clip-only" if clip_only else ("no-dp" if eps is None else f"eps-{eps:g}")
        over = overrides_for(args, model_ref, work, name, eps, clip_only)
        print(f"[utility] {arm_label(eps, clip_only)}: flwr run . ({args.clients} supernodes)"
              " ...", flush=True)
        res: dict = {"eps": eps, "clip_only": clip_only, "name": name}
        try:
            _, wall = C.run_flwr(over, num_supernodes=args.clients, num_cpus=args.client_cpus,
                                 log_path=work / f"{name}.log")
            res["wall_s"] = wall
            res["records"] = C.read_metrics(work, name)
        except Exception as e:  # keep the other arms
            res["error"] = str(e)[-2000:]
            print(f"[utility] {name} FAILED: {str(e)[-1500:]}", flush=True)
        if "records" in res and args.eval == "final":
            try:
                res["final_eval"], res["zero_eval"] = evaluate_final(over, work / name)
            except Exception as e:
                res["error"] = f"final evaluation failed: {e}"
                print(f"[utility] {name} final evaluation FAILED: {e}", flush=True)
        results.append(res)
        if "records" in res:
            last = res["records"][-1]
            print(f"[utility] {name} done in {res['wall_s']:.0f}s: accuracy "
                  f"{[(r['round'], r.get('server_accuracy')) for r in res['records']]}, final "
              f"{res.get('final_eval')}, "
                  f"eps {last.get('fit_dp_epsilon')}, sigma "
                  f"{last.get('fit_dp_noise_multiplier')}", flush=True)
        report(args, results, arms, work, t_start)


_ZERO: dict = {}


def evaluate_final(overrides: dict, run_path: Path) -> tuple[dict, dict]:
    """Score the run's last global adapter (``state.npz`` checkpoint, in trainable order, as
    the server resumes it) and, once, the zero-shot model: the server's ``evaluate_model``
    on the server's test set. The model is freed afterwards (memory for the next run)."""
    import gc

    from fatellm_flwr.data import split_pool_and_test, tokenize_dataset
    from fatellm_flwr.metrics import evaluate_model
    from fatellm_flwr.models import (
        clear_model_cache,
        get_trainable_state,
        load_peft_model,
        set_trainable_state,
    )
    from fatellm_flwr.outputs import RunDir
    from fatellm_flwr.strategies.base import TrackedStrategy

    cfg = C.app_config(overrides)
    model, tok = load_peft_model(cfg)
    task_data, _, test, _ = split_pool_and_test(cfg)
    test_tok = tokenize_dataset(test, tok, cfg, task_data)
    try:
        if not _ZERO:
            t0 = time.perf_counter()
            set_trainable_state(model, get_trainable_state(model))  # initial: LoRA B = 0
            _ZERO.update(evaluate_model(model, tok, test, test_tok, task_data, cfg))
            _ZERO["eval_s"] = time.perf_counter() - t0
        done, arrays, _ = RunDir(run_path).load_checkpoint()
        glob, _ = TrackedStrategy.split_checkpoint(arrays)
        set_trainable_state(model, glob)
        t0 = time.perf_counter()
        out = dict(evaluate_model(model, tok, test, test_tok, task_data, cfg))
        out.update(round=done, eval_s=time.perf_counter() - t0)
    finally:
        del model
        clear_model_cache()
        gc.collect()
    return out, dict(_ZERO)


def report(args, results, arms, work: Path, t_start: float, command: str | None = None) -> None:
    command = command or C.command_line()
    nan = float("nan")
    rows, round_rows = [], []
    for res in results:
        label = arm_label(res["eps"], res["clip_only"])
        if "records" not in res:
            rows.append([label, "FAILED", "", "", "", "", "", "", "", ""])
            continue
        recs = res["records"]
        last = dict(recs[-1])
        zero = next((r for r in recs if r["round"] == 0), {})
        if "final_eval" in res:  # scored in-process (--eval final)
            zero = {"server_accuracy": res["zero_eval"].get("accuracy", nan)}
            last.update(server_accuracy=res["final_eval"].get("accuracy", nan),
                        server_loss=res["final_eval"].get("loss", nan))
        dp = res["eps"] is not None or res["clip_only"]
        eps_spent = last.get("fit_dp_epsilon", nan) if dp else math.inf
        rows.append([
            label,
            "inf" if res["eps"] is None else f"{res['eps']:g}",
            last.get("fit_dp_noise_multiplier", 0.0 if not dp else nan),
            eps_spent,
            zero.get("server_accuracy", nan),
            last.get("server_accuracy", nan),
            last.get("server_loss", nan),
            last.get("fit_train_loss", nan),
            round(res["wall_s"], 1),
            "/".join(str(r.get("clients_ok", "?")) for r in recs if r["round"] > 0),
        ])
        for r in recs:
            round_rows.append([res["name"], r["round"], r.get("server_accuracy", nan),
                               r.get("server_loss", nan), r.get("fit_train_loss", nan),
                               r.get("fit_dp_epsilon", nan), r.get("round_time_s", nan)])
    main_table = C.markdown_table(
        ["arm", "target eps", "noise multiplier", "eps spent (clients' weighted mean, "
         "after last round)", "accuracy round 0 (zero-shot)",
         f"accuracy round {args.rounds}", f"test loss round {args.rounds}",
         "mean client train loss (last round)", "flwr run wall (s)",
         "clients aggregated per round"], rows)
    per_round = C.markdown_table(
        ["run", "round", "server accuracy", "server loss", "client train loss",
         "client eps (weighted mean)", "round time (s)"], round_rows)
    pending = [arm_label(e, c) for e, c in arms[len(results):]]
    n_train = (args.max_examples - args.test_size) * 0.9
    q = args.batch_size / max(1.0, n_train / args.clients)
    body = "\n\n".join(x for x in [
        f"Model `{args.model}`, BBC News (`builtin:bbc-news`): {args.max_examples} of 2,225 "
        f"articles (stratified), {args.test_size} held out for the server's test set, the rest "
        f"{args.partitioner}"
        + (f"(alpha={args.dirichlet_alpha})" if args.partitioner == "dirichlet" else "")
        + f"-partitioned over {args.clients} clients (90% train each). LoRA r=8, alpha 16, "
        f"dropout 0, all linear layers; {args.rounds} rounds x {args.local_steps} local steps, "
        f"batch {args.batch_size} (DP: Poisson, expected {args.batch_size}), max length "
        f"{args.max_length}, AdamW lr {args.lr}, FedAvg of all {args.clients} clients each "
        f"round. DP: sample-level, delta {args.dp_delta}, per-sample clip "
        f"{args.dp_max_grad_norm}, RDP accountant, noise derived for {args.rounds} x "
        f"{args.local_steps} = {args.rounds * args.local_steps} planned steps at q = batch / "
        f"client train size (~{q:.3f} for an average client).",
        main_table,
        ("Not finished: " + ", ".join(pending)) if pending else "",
        "Per round (metrics.json of each run):", per_round] if x)
    notes = [
        "epsilon is per client and sample-level (one BBC article), for the whole run, "
        "from the RDP accountant of Opacus on each client's (noise, q, steps) history; the "
        "table shows the example-weighted mean over clients that `metrics.json` records "
        "(`fit_dp_epsilon`). Each client's own q depends on its partition size, so its noise "
        "multiplier differs slightly; the table shows the weighted mean as well.",
        "The no-DP arm uses `train_local` (HF token-mean loss over the batch, batch-level "
        "gradient clipping 1.0, fixed batch 4); DP arms use `train_local_dp` (per-sequence "
        "mean loss, per-sample clipping, Poisson batches of random size). The clip-only arm "
        "(if present) isolates the effect of clipping + Poisson sampling from the noise.",
        f"One seed, one split, a {args.test_size}-example test set: binomial s.e. of an "
        f"accuracy near 0.5 is {(0.25 / max(1, args.test_size)) ** 0.5:.3f}; differences "
        "smaller than ~2 s.e. are noise.",
        f"Every round should aggregate all {args.clients} clients (last column); fewer means "
        "a client failed (e.g. Ray killed its actor when the box ran low on memory) and that "
        "arm is not comparable.",
        f"Outputs and logs: {work}."
        + ("" if args.report_only else f" Took {time.perf_counter() - t_start:.0f}s in all."),
    ]
    (work / "results.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "records"} | {"records": r.get("records"),
                                                            "command": command}
         for r in results], indent=1, default=str))
    C.emit(NAME, "Utility vs privacy: server accuracy vs sample-level DP-SGD epsilon", body,
           command, notes)


if __name__ == "__main__":
    main()
