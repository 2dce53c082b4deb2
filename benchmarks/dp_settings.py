"""Choosing DP settings: sample-level DP-SGD at epsilon 8 / 3 / 1 and client-level DP, vs no DP.

DP fine-tuning keeps most of the non-private gain when batches are large and the tuned
parameters few (Li et al. 2021, arXiv 2110.05679; Yu et al. 2021, arXiv 2110.06500). This
benchmark measures that on the FedHomoLLM path with the package's own strategy and client
classes, driven in-process message by message (``benchmarks/_inprocess.py``: the same
configure_fit -> fit -> aggregate_fit -> evaluate sequence as ``flwr run``, no Ray, so the
real model fits a 2-core box).

Arms (same data, model, LoRA, rounds and local epochs; only the privacy differs):

- ``no-dp``: plain local training (AdamW, fixed batches);
- ``eps-8`` / ``eps-3`` / ``eps-1``: ``dp-sgd=true dp-target-epsilon=E``: Poisson batches of
  expected size ``batch-size`` processed ``dp-physical-batch-size`` at a time (virtual
  batching), per-sample clipping, noise derived for the planned steps at the client's real
  sampling rate; epsilon per client from the RDP accountant;
- ``client-dp``: ``--client-dp-clients`` clients (the same data split finer), a fraction
  sampled per round, each client's update clipped and the sum noised by the server
  (DP-FedAvg, McMahan et al. 2018); client-level epsilon from the strategy's accountant.
  The same number of rounds and local epochs, so the same examples are processed in all.

Reported: the server's accuracy and loss on the held-out split after each round, the
epsilon spent, the noise multiplier, wall time per arm, and each DP arm's gain over
zero-shot as a fraction of the no-DP gain.

    python benchmarks/dp_settings.py                          # SmolLM2-135M, BBC News
    python benchmarks/dp_settings.py --model tiny --quick     # pipeline check
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import _common as C
from _inprocess import drive

NAME = "dp_settings"
SAMPLE_ARMS = {"no-dp": None, "eps-8": 8.0, "eps-3": 3.0, "eps-1": 1.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--arms", default="no-dp,eps-8,eps-1,client-dp,eps-3")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-epochs", type=float, default=0.35)
    p.add_argument("--batch-size", type=int, default=32, help="expected (Poisson) batch")
    p.add_argument("--physical-batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-2, help="AdamW learning rate without DP")
    p.add_argument("--dp-lr", type=float, default=5e-2,
                   help="AdamW learning rate of the DP-SGD arms (0 = --lr)")
    p.add_argument("--lora-r", type=int, default=1)
    p.add_argument("--target-modules", default="v_proj")
    p.add_argument("--last-layers", type=int, default=8, help="peft-last-layers")
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--max-examples", type=int, default=0, help="0 = all 2,225 articles")
    p.add_argument("--test-size", type=int, default=100)
    p.add_argument("--partitioner", default="iid", choices=("iid", "dirichlet"))
    p.add_argument("--clip", type=float, default=0.1, help="dp-max-grad-norm")
    p.add_argument("--client-dp-clients", type=int, default=30)
    p.add_argument("--client-dp-fraction", type=float, default=0.5)
    p.add_argument("--client-dp-noise", type=float, default=1.0)
    p.add_argument("--client-dp-clip", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--seeds", default="", help="comma-separated seeds: every arm runs once per "
                   "seed (data split, held-out set, init and batches all change); default: "
                   "--seed only")
    p.add_argument("--work-dir", default="", help="per-arm results.json (default: temp dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra run-config key for every arm (TOML value), repeatable")
    p.add_argument("--quick", action="store_true", help="tiny settings, results not written")
    p.add_argument("--name", default=NAME, help="results file benchmarks/results/<name>.md")
    p.add_argument("--report-only", default="", metavar="RESULTS_JSON",
                   help="run nothing: write the report from a results.json of an earlier run "
                        "(the other options must match that run's)")
    return p.parse_args(argv)


def base_config(args, model: str) -> dict:
    return {"algorithm": "homo", "model": model, "dataset": "builtin:bbc-news",
            "peft-method": "lora", "lora-r": args.lora_r, "lora-alpha": 2.0 * args.lora_r,
            "lora-dropout": 0.0, "target-modules": args.target_modules,
            "num-server-rounds": args.rounds, "local-steps": 0,
            "local-epochs": args.local_epochs, "batch-size": args.batch_size,
            "grad-accum": 1, "lr": args.lr, "max-length": args.max_length,
            "max-examples": args.max_examples, "test-size": args.test_size,
            "val-fraction": 0.0, "partitioner": args.partitioner, "dirichlet-alpha": 0.5,
            "seed": args.seed, "aggregator": "fedavg", "fraction-fit": 1.0,
            "min-fit-clients": args.clients, "min-available-clients": args.clients,
            "fraction-evaluate": 0.0, "plots": False, "save-every-round": False,
            "num-threads": args.threads, "dp-delta": 1e-5, "dp-max-grad-norm": args.clip,
            "dp-physical-batch-size": args.physical_batch_size,
            "peft-last-layers": args.last_layers, "use-chat-template": False,
            **_extra(args.set)}


def _extra(pairs: list[str]) -> dict:
    import tomllib

    return tomllib.loads("\n".join(pairs))


def arm_config(name: str, args, model: str) -> tuple[dict, int]:
    """The arm's run config and its number of clients."""
    cfg = base_config(args, model)
    if name in SAMPLE_ARMS:
        eps = SAMPLE_ARMS[name]
        if eps is not None:
            cfg.update({"dp-sgd": True, "dp-target-epsilon": eps,
                        "lr": args.dp_lr or args.lr})
        return cfg, args.clients
    if name == "client-dp":
        n = args.client_dp_clients
        per_round = max(2, round(args.client_dp_fraction * n))
        # as many rounds as it takes to process the same examples as the sample-level arms
        cfg["num-server-rounds"] = max(1, round(args.rounds / args.client_dp_fraction))
        # local batch scaled with the smaller client datasets; the same epochs per round
        cfg.update({"client-dp": "server-fixed",
                    "client-dp-noise-multiplier": args.client_dp_noise,
                    "client-dp-clip-norm": args.client_dp_clip,
                    "batch-size": max(4, args.batch_size * args.clients // n),
                    "fraction-fit": args.client_dp_fraction, "min-fit-clients": per_round,
                    "min-available-clients": n})
        return cfg, n
    raise SystemExit(f"unknown arm {name!r}: allowed {[*SAMPLE_ARMS, 'client-dp']}")


def run_arm(name: str, args, model: str) -> dict:
    import torch

    from fatellm_flwr.clients.homo import HomoClient
    from fatellm_flwr.models import clear_model_cache
    from fatellm_flwr.outputs import RunDir
    from fatellm_flwr.strategies.homo import HomoStrategy

    over, n = arm_config(name, args, model)
    cfg = C.app_config(over)
    torch.set_num_threads(args.threads)
    clear_model_cache()  # every arm starts from the base model, not the last arm's adapter
    out = tempfile.mkdtemp(prefix=f"dp-settings-{name}-")
    strategy = HomoStrategy(cfg, RunDir.create(out, name, "homo"))
    t0 = time.perf_counter()
    rounds = cfg.num_server_rounds
    drive(strategy, lambda pid, ctx: HomoClient(cfg, pid, n, ctx), n, rounds,
          log=lambda m: print(f"[{name}] {m}", flush=True))
    wall = time.perf_counter() - t0
    recs = {r["round"]: r for r in strategy.run.records}
    last = recs[rounds]
    res = {"name": name, "seed": args.seed, "clients": n, "wall_s": wall,
           "rounds": rounds,
           "acc": [recs[r].get("server_accuracy") for r in range(rounds + 1)],
           "loss": [recs[r].get("server_loss") for r in range(rounds + 1)],
           "eps": last.get("fit_dp_epsilon", last.get("client_dp_epsilon")),
           "noise": last.get("fit_dp_noise_multiplier"),
           "train_loss": last.get("fit_train_loss"),
           "clients_ok": [recs[r].get("clients_ok") for r in range(1, rounds + 1)],
           "record": {k: v for k, v in last.items() if isinstance(v, (int, float, str))}}
    print(f"[{name}] {json.dumps({k: v for k, v in res.items() if k != 'record'})}",
          flush=True)
    return res


def prepare(argv=None) -> argparse.Namespace:
    """Parsed arguments, with ``--quick``'s tiny settings applied."""
    args = parse_args(argv)
    if args.quick:
        args.rounds, args.max_examples, args.test_size, args.max_length = 2, 120, 12, 48
        args.batch_size, args.physical_batch_size, args.client_dp_clients = 8, 4, 6
        args.last_layers = 1
    return args


def run_all(args) -> list[dict]:
    """Every arm of ``--arms`` in turn; ``results.json`` in the work dir after each."""
    model = C.resolve_model_arg(args.model)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dp-settings-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"[dp-settings] per-arm results in {work / 'results.json'}", flush=True)
    results = []
    for seed in seeds_of(args):
        for name in [a.strip() for a in args.arms.split(",") if a.strip()]:
            results.append(run_arm(name, argparse.Namespace(**{**vars(args), "seed": seed}),
                                   model))
            (work / "results.json").write_text(json.dumps(results, indent=1))
    return results


def seeds_of(args) -> list[int]:
    """The seeds every arm runs with: ``--seeds`` if given, else ``[--seed]``."""
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    return seeds or [args.seed]


def main(argv=None) -> None:
    args = prepare(argv)
    load0 = C.load_avg()
    if args.report_only:
        results = json.loads(Path(args.report_only).read_text())
        report(args, results, None, C.command_line(), write=not args.quick)
        return
    results = run_all(args)
    report(args, results, load0, C.command_line(), write=not args.quick)


def gain_fraction(res: dict, base: dict | None) -> float | None:
    """(final - zero-shot) / (no-DP final - zero-shot), or None without a no-DP arm."""
    if base is None or res["acc"][-1] is None:
        return None
    denom = base["acc"][-1] - base["acc"][0]
    return (res["acc"][-1] - res["acc"][0]) / denom if denom > 0 else None


def _seed(r: dict, args) -> int:
    return int(r.get("seed", args.seed))  # results.json of runs before --seeds had no seed


def repeated_summary(results: list[dict], args) -> list[tuple[str, str]]:
    """Per DP arm over seeds: the gain fraction per seed (paired with that seed's no-DP arm)
    and the pooled fraction (mean gain / mean no-DP gain)."""
    bases = {_seed(r, args): r for r in results if r["name"] == "no-dp"}
    out = []
    for name in dict.fromkeys(r["name"] for r in results if r["name"] != "no-dp"):
        runs = [r for r in results if r["name"] == name and _seed(r, args) in bases]
        fracs = [f for r in runs if (f := gain_fraction(r, bases[_seed(r, args)])) is not None]
        if not fracs:
            continue
        gain = statistics.mean(r["acc"][-1] - r["acc"][0] for r in runs)
        base_gain = statistics.mean(bases[_seed(r, args)]["acc"][-1]
                                    - bases[_seed(r, args)]["acc"][0] for r in runs)
        eps = statistics.mean(r["eps"] for r in runs if r["eps"] is not None)
        out.append((f"DP-SGD {name} (eps {eps:.3g}) over {len(fracs)} seeds: gain over "
                    f"zero-shot / no-DP gain (BBC News, {args.clients} clients)",
                    f"per seed {C.fmt_spread(fracs)}; pooled {gain:.3f} / {base_gain:.3f} = "
                    f"{gain / base_gain:.3f}" if base_gain > 0 else "no-DP gain <= 0"))
    return out


def report(args, results: list[dict], load0, command: str, write: bool = True) -> str:
    bases = {_seed(r, args): r for r in results if r["name"] == "no-dp"}
    seeds = list(dict.fromkeys(_seed(r, args) for r in results))
    base = bases.get(seeds[0]) if seeds else None
    rows = []
    for r in results:
        frac = gain_fraction(r, bases.get(_seed(r, args)))
        rows.append([r["name"], _seed(r, args), r["clients"], C.fmt(r["noise"]),
                     C.fmt(r["eps"]), " -> ".join(C.fmt(a) for a in r["acc"]),
                     C.fmt(r["loss"][-1]), "" if frac is None else C.fmt(frac, 3),
                     C.fmt_duration(r["wall_s"])])
    table = C.markdown_table(
        ["arm", "seed", "clients", "noise multiplier (mean)", "epsilon (delta 1e-5)",
         "server accuracy per round (round 0 = zero-shot)", "final test loss",
         "gain / no-DP gain", "wall"], rows)
    body = "\n".join([
        f"Model `{args.model}`, BBC News (builtin), {args.max_examples or 'all 2,225'} "
        "articles, "
        f"{args.test_size} held out for the server, the rest {args.partitioner}-split over "
        f"{args.clients} clients; LoRA r={args.lora_r} (alpha {2 * args.lora_r}) on "
        f"{args.target_modules} of the last {args.last_layers} blocks; {args.rounds} rounds x "
        f"{args.local_epochs:g} local epoch(s), expected batch {args.batch_size} (DP: Poisson, "
        f"{args.physical_batch_size} per pass), AdamW lr {args.lr:g} (DP-SGD arms: "
        f"{args.dp_lr or args.lr:g}), max length "
        f"{args.max_length}, per-sample clip {args.clip:g}. Client-level arm: "
        f"{args.client_dp_clients} clients, {args.client_dp_fraction:g} sampled per round, "
        f"server-side fixed clipping {args.client_dp_clip:g}, noise multiplier "
        f"{args.client_dp_noise:g}, {round(args.rounds / args.client_dp_fraction)} rounds (the "
        "same examples processed as in the sample-level arms). "
        f"Extra keys: {args.set or 'none'}. Seeds {seeds}: one run per arm and seed "
        f"(binomial s.e. of an accuracy near 0.8 on {args.test_size} examples: "
        f"{(0.16 / max(1, args.test_size)) ** 0.5:.3f}).", "", table, "",
        f"Load average before / after: {load0} / {C.load_avg()}."])
    summary = []
    if len(seeds) > 1:
        summary = repeated_summary(results, args)
    elif base is not None:
        summary.append(("DP-SGD: accuracy gain over zero-shot vs the no-DP gain (BBC News, "
                        f"{args.clients} clients)",
                        "; ".join(f"{r['name']}: {C.fmt(r['acc'][0])} -> "
                                  f"{C.fmt(r['acc'][-1])} (eps {C.fmt(r['eps'])}"
                                  + (f", {C.fmt(gain_fraction(r, base), 3)} of the gain)"
                                     if r is not base else ")")
                                  for r in results)))
    return C.emit(args.name, "Choosing DP settings: accuracy vs epsilon with large DP batches",
                  body, command, write=write, notes=[
                      "Sample-level epsilon is per client (one article), the example-weighted "
                      "mean over clients after the last round, from Opacus' RDP accountant on "
                      "the client's real (noise, sampling rate, steps) history.",
                      "Client-level epsilon is the server's accountant for DP-FedAvg at the "
                      "real sampling rate (sampled / available clients)."],
                  summary=summary)


if __name__ == "__main__":
    main()
