"""FlexLoRA (heterogeneous LoRA ranks) vs FedAvg with every client at rank 8.

Bai et al. 2024 (arXiv 2402.11505): clients tune LoRA at ranks their hardware allows; the
server averages the products B·A and gives each client a truncated SVD at its own rank.
Arms, same data, seeds and steps, driven in-process message by message
(benchmarks/_inprocess.py):

- ``fedavg-r8``: homo FedAvg of A and B, every client at rank 8;
- ``flexlora-4-8-16``: ``lora-ranks=4,8,16`` (clients 0, 1, 2).

Reported: the server's accuracy/loss on the held-out test split after each round, and the
bytes per client and round (up, down) from the strategy's ledger.

    python benchmarks/flexlora.py                     # SmolLM2-135M, BBC News, 3 clients
    python benchmarks/flexlora.py --model tiny --quick  # smoke test
"""

from __future__ import annotations

import argparse
import time

import _common as C
from _inprocess import drive

ARMS = {"fedavg-r8": {"lora-r": 8, "lora-ranks": ""},
        "flexlora-4-8-16": {"lora-r": 8, "lora-ranks": "4,8,16"}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=6)
    p.add_argument("--max-examples", type=int, default=240)
    p.add_argument("--test-size", type=int, default=40)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="tiny settings, results not written")
    return p.parse_args(argv)


def run_arm(name: str, args, model: str, data: str) -> dict:
    import tempfile

    from fatellm_flwr.clients.homo import HomoClient
    from fatellm_flwr.outputs import RunDir
    from fatellm_flwr.strategies.homo import HomoStrategy

    cfg = C.app_config({"algorithm": "homo", "model": model, "dataset": data,
                        "num-server-rounds": args.rounds, "local-steps": args.local_steps,
                        "batch-size": 4, "lr": 5e-4, "max-length": args.max_length,
                        "max-examples": args.max_examples, "test-size": args.test_size,
                        "partitioner": "dirichlet", "dirichlet-alpha": 0.5,
                        "fraction-evaluate": 0.0, "min-fit-clients": 3,
                        "min-available-clients": 3, "plots": False, **ARMS[name]})
    out = tempfile.mkdtemp(prefix="flexlora-bench-")
    strategy = HomoStrategy(cfg, RunDir.create(out, name, "homo"))
    t0 = time.perf_counter()
    drive(strategy, lambda pid, ctx: HomoClient(cfg, pid, 3, ctx), 3, args.rounds)
    recs = {r["round"]: r for r in strategy.run.records}
    last = recs[args.rounds]
    per_client = strategy.ledger.rounds[args.rounds]
    return {"acc": [recs[r].get("server_accuracy") for r in range(args.rounds + 1)],
            "loss": [recs[r].get("server_loss") for r in range(args.rounds + 1)],
            "up": last["bytes_up_per_client"], "down": last["bytes_down_per_client"],
            "down_by_client": {c: v["down"] for c, v in sorted(per_client.items())},
            "time": time.perf_counter() - t0}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.rounds, args.local_steps, args.max_examples, args.test_size = 2, 2, 90, 15
        args.max_length = 48
    model = C.resolve_model_arg(args.model)
    data = "builtin:bbc-news"
    load0 = C.load_avg()
    res = {name: run_arm(name, args, model, data) for name in ARMS}
    rows = []
    for name, r in res.items():
        rows.append([name, " / ".join(C.fmt(a) for a in r["acc"]),
                     " / ".join(C.fmt(x) for x in r["loss"]), C.fmt(r["up"]),
                     C.fmt(r["down"]),
                     ", ".join(f"{C.fmt(v)}" for v in r["down_by_client"].values()),
                     C.fmt_duration(r["time"])])
    table = C.markdown_table(
        ["arm", "server accuracy (round 0 / 1 / ...)", "server loss", "bytes up per client "
         f"(round {args.rounds})", f"bytes down per client (round {args.rounds})",
         "bytes down, clients 0 / 1 / 2", "wall time"], rows)
    f, x = res["fedavg-r8"], res["flexlora-4-8-16"]
    body = "\n".join([
        f"Model `{args.model}`, BBC News (builtin), {args.max_examples} examples, "
        f"test split {args.test_size}, 3 clients (Dirichlet 0.5), {args.rounds} rounds x "
        f"{args.local_steps} local steps (batch 4, lr 5e-4, max length {args.max_length}), "
        "LoRA alpha 16 on every linear layer. One run per arm (no repetitions: each arm "
        "trains a real model; accuracy differences of a few test examples are noise).", "",
        table, "",
        f"FlexLoRA bytes vs FedAvg r=8: up {x['up'] / f['up']:.2f}x, down "
        f"{x['down'] / f['down']:.2f}x per client in round {args.rounds} (ranks 4+8+16 "
        "average 9.3 vs 8; the global state is kept at rank 16, so a rank-16 client "
        "downloads 2x the r=8 payload and a rank-4 client half of it).",
        "", f"Load average before/after: {load0} / {C.load_avg()}."])
    C.emit("flexlora", "FlexLoRA ranks {4, 8, 16} vs FedAvg at rank 8", body,
           C.command_line(), write=not args.quick, summary=[
               ("FlexLoRA {4,8,16} vs FedAvg r=8: final server accuracy",
                f"{C.fmt(x['acc'][-1])} vs {C.fmt(f['acc'][-1])}"),
               ("FlexLoRA {4,8,16} vs FedAvg r=8: bytes up per client-round",
                f"{x['up'] / f['up']:.2f}x")])


if __name__ == "__main__":
    main()
