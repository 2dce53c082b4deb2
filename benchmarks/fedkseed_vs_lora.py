"""FedKSeed vs LoRA FedAvg at equal client compute: test loss against compute spent.

Qin et al. 2024 (FedKSeed, arXiv 2312.06353) report zeroth-order full-parameter tuning
along K shared seeds on par with federated LoRA after enough steps, while uploading only
(seed, scalar) pairs. This benchmark gives both methods the same budget of client compute
and records the server's test loss after every round against

- the clients' compute seconds spent so far (every ``client.fit`` timed, FedKSeed's replay
  of the global coefficients included: it is part of what a round costs a client), and
- the forward passes spent so far per client (FedKSeed: 2 per ZO step; LoRA: 1 forward and
  1 backward per step, backward counted separately),

then reports whether and where the curves meet: the first compute point at which
FedKSeed's loss is at or below LoRA's loss at the same compute (LoRA's curve linearly
interpolated), or the remaining gap when the budget ends.

Both arms use the package's own strategies and clients, driven in-process message by
message (``benchmarks/_inprocess.py``), the same data split, seed, batch and length; each
arm runs rounds until its clients' compute reaches ``--budget-s`` (or ``--max-rounds``).
FedKSeed uses K = ``--k`` candidate seeds and ``--kseed-steps`` local steps (the paper: 4096
and 200); its ``zo-lr`` / ``zo-eps`` are stated in the report.

    python benchmarks/fedkseed_vs_lora.py --budget-s 3600          # SmolLM2 (GPU: --device cuda)
    python benchmarks/fedkseed_vs_lora.py --model tiny --quick     # pipeline check
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import _common as C
from _inprocess import drive

NAME = "fedkseed_vs_lora"
AXES = {"compute_s": "client compute seconds", "forwards_per_client": "forward passes per client"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--budget-s", type=float, default=3600.0,
                   help="client compute seconds per arm (sum over clients)")
    p.add_argument("--max-rounds", type=int, default=200)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--k", type=int, default=4096, help="FedKSeed candidate seeds K")
    p.add_argument("--kseed-steps", type=int, default=200, help="FedKSeed local ZO steps")
    p.add_argument("--zo-lr", type=float, default=2e-6)
    p.add_argument("--zo-eps", type=float, default=1e-3)
    p.add_argument("--zo-cache-z", action="store_true",
                   help="zo-cache-z=true: one z generation per ZO step instead of three "
                        "(benchmarks/zo_cache_z.py), same weights")
    p.add_argument("--lora-steps", type=int, default=10, help="LoRA local steps per round")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--max-examples", type=int, default=600)
    p.add_argument("--test-size", type=int, default=60)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--arms", default="lora,fedkseed")
    p.add_argument("--quick", action="store_true", help="tiny settings, results not written")
    args = p.parse_args(argv)
    if args.quick:
        args.budget_s, args.max_rounds, args.kseed_steps, args.lora_steps = 1e9, 2, 6, 2
        args.k, args.max_examples, args.test_size, args.max_length = 64, 60, 12, 48
        args.zo_lr, args.zo_eps, args.threads = 1e-3, 1e-3, 1
    return args


class TimedClient:
    """A client whose ``fit`` calls are timed into ``spent`` (seconds, summed)."""

    def __init__(self, client, spent: list[float]):
        self.client, self.spent = client, spent

    def fit(self, parameters, config):
        t0 = time.perf_counter()
        out = self.client.fit(parameters, config)
        self.spent[0] += time.perf_counter() - t0
        return out

    def evaluate(self, parameters, config):
        return self.client.evaluate(parameters, config)


def arm_config(name: str, args, model: str):
    common = {"model": model, "dataset": "builtin:bbc-news", "num-server-rounds":
              args.max_rounds, "batch-size": args.batch_size, "max-length": args.max_length,
              "max-examples": args.max_examples, "test-size": args.test_size,
              "partitioner": "iid", "seed": args.seed, "min-fit-clients": args.clients,
              "min-available-clients": args.clients, "fraction-evaluate": 0.0,
              "save-every-round": False, "plots": False, "device": args.device,
              "num-threads": args.threads}
    if name == "fedkseed":
        return C.app_config({**common, "algorithm": "fedkseed", "zo-num-seeds": args.k,
                             "local-steps": args.kseed_steps, "zo-lr": args.zo_lr,
                             "zo-eps": args.zo_eps, "zo-cache-z": args.zo_cache_z})
    if name == "lora":
        return C.app_config({**common, "algorithm": "homo", "peft-method": "lora",
                             "lora-r": args.lora_r, "lora-alpha": 2.0 * args.lora_r,
                             "lora-dropout": 0.0, "local-steps": args.lora_steps,
                             "lr": args.lr})
    raise SystemExit(f"unknown arm {name!r}: allowed 'lora', 'fedkseed'")


def run_arm(name: str, args, model: str) -> dict:
    import torch

    from fatellm_flwr.clients.fedkseed import FedKSeedClient
    from fatellm_flwr.clients.homo import HomoClient
    from fatellm_flwr.models import clear_model_cache
    from fatellm_flwr.outputs import RunDir
    from fatellm_flwr.strategies.fedkseed import FedKSeedStrategy
    from fatellm_flwr.strategies.homo import HomoStrategy

    cfg = arm_config(name, args, model)
    torch.set_num_threads(args.threads)
    clear_model_cache()
    run = RunDir.create(tempfile.mkdtemp(prefix=f"kseed-vs-lora-{name}-"), name,
                        "fedkseed" if name == "fedkseed" else "homo")
    strategy = (FedKSeedStrategy if name == "fedkseed" else HomoStrategy)(cfg, run)
    client_cls = FedKSeedClient if name == "fedkseed" else HomoClient
    spent = [0.0]
    compute = {0: 0.0}

    def stop(rnd: int) -> bool:
        compute[rnd] = spent[0]
        return spent[0] >= args.budget_s

    t0 = time.perf_counter()
    drive(strategy, lambda pid, ctx: TimedClient(client_cls(cfg, pid, args.clients, ctx), spent),
          args.clients, args.max_rounds, stop=stop,
          log=lambda m: print(f"[{name}] {m} (client compute {spent[0]:.0f}s)", flush=True))
    steps = args.kseed_steps if name == "fedkseed" else args.lora_steps
    fwd_per_step = 2 if name == "fedkseed" else 1
    points = [{"round": r["round"], "loss": r.get("server_loss"),
               "accuracy": r.get("server_accuracy"), "compute_s": compute[r["round"]],
               "forwards_per_client": r["round"] * steps * fwd_per_step,
               "backwards_per_client": 0 if name == "fedkseed" else r["round"] * steps}
              for r in strategy.run.records if r["round"] in compute]
    res = {"name": name, "steps_per_round": steps, "wall_s": time.perf_counter() - t0,
           "points": points}
    print(f"[{name}] {json.dumps(res)}", flush=True)
    return res


def interpolate(points: list[dict], key: str, x: float) -> float | None:
    """The loss of a curve at ``x`` of ``key`` (linear between points; None outside)."""
    for a, b in zip(points, points[1:]):
        if a[key] <= x <= b[key] and b[key] > a[key]:
            t = (x - a[key]) / (b[key] - a[key])
            return a["loss"] + t * (b["loss"] - a["loss"])
    return None


def meeting(kseed: dict, lora: dict, key: str) -> str:
    """Where FedKSeed's loss first reaches LoRA's at equal ``key``, or the final gap."""
    lora_end = lora["points"][-1]
    for p in kseed["points"][1:]:
        other = interpolate(lora["points"], key, p[key])
        if other is not None and p["loss"] <= other:
            return f"meet at {p[key]:,.0f} {AXES[key]} (FedKSeed round {p['round']})"
        if other is None and p[key] > lora_end[key] and p["loss"] <= lora_end["loss"]:
            return (f"FedKSeed reaches LoRA's final loss ({lora_end['loss']:.3f}, at "
                    f"{lora_end[key]:,.0f}) at {p[key]:,.0f} {AXES[key]} (round {p['round']})")
    last = kseed["points"][-1]
    other = interpolate(lora["points"], key, last[key])
    if other is None:
        other = lora["points"][-1]["loss"]
        where = f"its last point, {lora['points'][-1][key]:,.0f}"
    else:
        where = "the same point"
    return (f"do not meet within the budget: at {last[key]:,.0f} {AXES[key]} FedKSeed's test "
            f"loss is {last['loss']:.3f}, LoRA's {other:.3f} (at {where})")


def report(args, results: list[dict], load0, write: bool) -> str:
    rows = []
    for r in results:
        for p in r["points"]:
            rows.append([r["name"], p["round"], C.fmt(p["compute_s"], 4),
                         f"{p['forwards_per_client']:,}", f"{p['backwards_per_client']:,}",
                         C.fmt(p["loss"]), C.fmt(p["accuracy"])])
    table = C.markdown_table(["arm", "round", "client compute so far (s, all clients)",
                              "forward passes per client", "backward passes per client",
                              "server test loss", "server accuracy"], rows)
    by = {r["name"]: r for r in results}
    verdict = []
    if "fedkseed" in by and "lora" in by:
        for key in ("compute_s", "forwards_per_client"):
            verdict.append(f"- by {AXES[key]}: {meeting(by['fedkseed'], by['lora'], key)}.")
    body = "\n".join([
        f"Model `{args.model}` (device {args.device}), BBC News (builtin), "
        f"{args.max_examples} articles, {args.test_size} held out, IID over {args.clients} "
        f"clients, batch {args.batch_size} x max length {args.max_length}, seed {args.seed}. "
        f"FedKSeed: K = {args.k}, {args.kseed_steps} local ZO steps per round, zo-lr "
        f"{args.zo_lr:g}, zo-eps {args.zo_eps:g} (embeddings excluded, the default), "
        f"zo-cache-z {str(args.zo_cache_z).lower()}. LoRA "
        f"FedAvg: r={args.lora_r} on the default target modules, {args.lora_steps} local "
        f"steps per round, AdamW lr {args.lr:g}. Budget {args.budget_s:g} client-compute "
        f"seconds per arm (max {args.max_rounds} rounds); one run per arm.", "", table, "",
        "Do the curves meet?", "", *verdict, "",
        f"Load average before / after: {load0} / {C.load_avg()}."])
    summary = []
    if verdict:
        summary.append((f"FedKSeed (K={args.k}, {args.kseed_steps} steps) vs LoRA FedAvg at "
                        f"equal client compute ({args.model.split(':')[-1]}, BBC News)",
                        " ".join(v[2:] for v in verdict)))
    return C.emit(NAME, "FedKSeed vs LoRA FedAvg at equal client compute", body,
                  C.command_line(), write=write, summary=summary, notes=[
                      "Client compute = the summed wall time of every client.fit (the clients "
                      "run one after another in this process); server aggregation and "
                      "evaluation are not counted.",
                      "A backward pass costs about two forward passes; the forward-pass axis "
                      "therefore favours LoRA's count and the compute-seconds axis is the "
                      "fair one on the same hardware."])


def main(argv=None) -> None:
    args = parse_args(argv)
    load0 = C.load_avg()
    model = C.resolve_model_arg(args.model)
    results = [run_arm(a.strip(), args, model) for a in args.arms.split(",") if a.strip()]
    report(args, results, load0, write=not args.quick)


if __name__ == "__main__":
    main()
