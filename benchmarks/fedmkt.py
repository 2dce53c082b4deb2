"""FedMKT on BBC News: does the LLM gain, do the SLMs gain, and what travels?

Fan et al. 2024 (arXiv 2406.02224) report that FedMKT's LLM comes close to the LLM
fine-tuned centrally on the union of the clients' data, and FATE-LLM that both the LLM and
the SLMs beat their stand-alone versions. Arms (same data split, seeds and step counts):

- ``SLM local-only``: each client's SLM LoRA-tuned on its own partition for
  ``rounds x local-steps`` steps, never federated;
- ``FedMKT``: the algorithm (server LLM, 3 client SLMs), driven in-process message by
  message (benchmarks/_inprocess.py: the exact legacy Flower sequence, each node's
  ``context.state`` kept across rounds); SLMs evaluated after the last round;
- ``LLM zero-shot`` (FedMKT's round 0), ``LLM after FedMKT``, and ``LLM centrally
  fine-tuned``: the LLM's LoRA trained on the union of the clients' training data for
  ``3 x rounds x local-steps`` steps (the clients' total).

Everything is evaluated on the same held-out examples (the test split minus the public
slice). Bytes per client-round come from the strategy's ledger, next to what LoRA FedAvg on
the SLM sends (its adapter, up and down).

    python benchmarks/fedmkt.py                         # Gemma 3 270M + 3 x SmolLM2-135M
    python benchmarks/fedmkt.py --model tiny --quick    # smoke test (tiny models)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common as C
from _inprocess import drive


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:gemma3-270m", help="server LLM (or tiny)")
    p.add_argument("--slm", default="builtin:smollm2-135m-instruct", help="clients' SLM")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=6)
    p.add_argument("--max-examples", type=int, default=240)
    p.add_argument("--test-size", type=int, default=56)
    p.add_argument("--public-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--quick", action="store_true", help="tiny settings, results not written")
    return p.parse_args(argv)


def evaluate_on(model, tokenizer, cfg, raw, task_data) -> dict:
    from fatellm_flwr.data import tokenize_dataset
    from fatellm_flwr.metrics import evaluate_model

    return evaluate_model(model, tokenizer, raw, tokenize_dataset(raw, tokenizer, cfg,
                                                                  task_data), task_data, cfg)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.rounds, args.local_steps, args.max_examples = 2, 2, 90
        args.test_size, args.public_size, args.max_length, args.top_k = 20, 6, 48, 4
    import datasets
    import torch

    from fatellm_flwr.clients.datasets import client_datasets
    from fatellm_flwr.clients.fedmkt import FedMKTClient
    from fatellm_flwr.models import get_trainable_state, set_trainable_state
    from fatellm_flwr.outputs import RunDir
    from fatellm_flwr.strategies.fedmkt import FedMKTStrategy
    from fatellm_flwr.testing import build_tiny_model
    from fatellm_flwr.train import train_local

    llm, slm = args.model, args.slm
    if args.model.startswith("tiny"):
        tmp = Path(tempfile.mkdtemp(prefix="fedmkt-bench-"))
        llm = str(build_tiny_model("llama", tmp / "llm", num_layers=2, seed=1))
        slm = str(build_tiny_model("gpt2", tmp / "slm", num_layers=2,
                                   tokenizer="sentencepiece"))
    cfg = C.app_config({
        "algorithm": "fedmkt", "model": llm, "slm-models": slm, "dataset": "builtin:bbc-news",
        "num-server-rounds": args.rounds, "local-steps": args.local_steps, "batch-size": 4,
        "eval-batch-size": 4, "lr": 5e-4, "max-length": args.max_length,
        "max-examples": args.max_examples, "test-size": args.test_size,
        "fedmkt-public-size": args.public_size, "fedmkt-top-k": args.top_k,
        "fedmkt-lambda": args.lam, "partitioner": "dirichlet", "dirichlet-alpha": 0.5,
        "min-fit-clients": 3, "min-available-clients": 3, "plots": False,
        "save-every-round": False})
    load0 = C.load_avg()
    t0 = time.perf_counter()
    out = tempfile.mkdtemp(prefix="fedmkt-bench-run-")
    strategy = FedMKTStrategy(cfg, RunDir.create(out, "fedmkt", "fedmkt"))
    llm_initial = [a.copy() for a in strategy.current]
    task_data, eval_raw, _ = strategy.test_sets()
    contexts = drive(strategy, lambda pid, ctx: FedMKTClient(cfg, pid, 3, ctx), 3, args.rounds)
    t_fedmkt = time.perf_counter() - t0
    recs = {r["round"]: r for r in strategy.run.records}
    # SLMs after FedMKT, and local-only SLMs, on the same held-out examples
    slm_fed, slm_local, lora_bytes = [], [], 0
    for pid in range(3):
        client = FedMKTClient(cfg, pid, 3, contexts[pid])
        client._restore()
        slm_fed.append(evaluate_on(client.model, client.tokenizer, client.slm_cfg, eval_raw,
                                   task_data)["accuracy"])
        lora_bytes = sum(a.nbytes for a in get_trainable_state(client.model))
        from fatellm_flwr.clients.fedmkt import _INITIAL

        set_trainable_state(client.model, _INITIAL[client._init_key])
        torch.manual_seed(cfg.seed + pid)
        train_local(client.model, client.train, client.slm_cfg,
                    steps=args.rounds * args.local_steps,
                    pad_id=client.tokenizer.pad_token_id, seed=cfg.seed + pid)
        slm_local.append(evaluate_on(client.model, client.tokenizer, client.slm_cfg, eval_raw,
                                     task_data)["accuracy"])
    # the LLM fine-tuned centrally on the union of the clients' training data
    t1 = time.perf_counter()
    set_trainable_state(strategy.model, llm_initial)
    union = datasets.concatenate_datasets([client_datasets(cfg, strategy.tokenizer, pid, 3)[1]
                                           for pid in range(3)])
    torch.manual_seed(cfg.seed)
    train_local(strategy.model, union, cfg, steps=3 * args.rounds * args.local_steps,
                pad_id=strategy.tokenizer.pad_token_id, seed=cfg.seed)
    central = strategy.evaluate_global(get_trainable_state(strategy.model))
    t_central = time.perf_counter() - t1
    last = recs[args.rounds]
    up, down = last["bytes_up_per_client"], last["bytes_down_per_client"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    rows = [["SLM local-only (mean of 3 clients)", C.fmt(mean(slm_local)),
             ", ".join(C.fmt(a) for a in slm_local)],
            ["SLM after FedMKT (mean of 3 clients)", C.fmt(mean(slm_fed)),
             ", ".join(C.fmt(a) for a in slm_fed)],
            ["LLM zero-shot", C.fmt(recs[0]["server_accuracy"]), ""],
            ["LLM after FedMKT", C.fmt(last["server_accuracy"]),
             " -> ".join(C.fmt(recs[r]["server_accuracy"]) for r in sorted(recs))],
            ["LLM centrally fine-tuned on the clients' union", C.fmt(central["accuracy"]), ""]]
    acc_table = C.markdown_table(["model", "accuracy", "detail (per client / per round)"], rows)
    byte_table = C.markdown_table(
        ["scheme", "bytes up per client-round", "bytes down per client-round"],
        [[f"FedMKT top-{args.top_k} logits on {args.public_size} public examples", C.fmt(up),
          C.fmt(down)],
         ["LoRA FedAvg on the SLM (r=8, all linear layers)", C.fmt(lora_bytes),
          C.fmt(lora_bytes)]])
    slm_gain = mean(slm_fed) - mean(slm_local)
    llm_gain = last["server_accuracy"] - recs[0]["server_accuracy"]
    verdict = (f"SLMs {'gain' if slm_gain > 0 else 'do not gain'} over local-only "
               f"({slm_gain:+.3f}); the LLM {'gains' if llm_gain > 0 else 'does not gain'} "
               f"over zero-shot ({llm_gain:+.3f}); centrally fine-tuned LLM "
               f"{C.fmt(central['accuracy'])}.")
    body = "\n".join([
        f"LLM `{args.model}`, SLMs `{args.slm}` (3 clients, Dirichlet 0.5), BBC News "
        f"(builtin), {args.max_examples} examples, test split {args.test_size} of which "
        f"{args.public_size} are the public set and {len(eval_raw)} are evaluated on; "
        f"{args.rounds} rounds x {args.local_steps} local steps (batch 4, lr 5e-4, max length "
        f"{args.max_length}), top-k {args.top_k}, lambda {args.lam}, selection "
        f"{cfg.fedmkt_selection}. One run (each arm trains real models on a shared 2-core "
        "CPU; differences of one or two of the evaluated examples are noise).", "",
        acc_table, "", byte_table, "", verdict, "",
        f"Wall time: FedMKT {C.fmt_duration(t_fedmkt)}, central LLM "
        f"{C.fmt_duration(t_central)}. Load average before/after: {load0} / {C.load_avg()}."])
    C.emit("fedmkt", "FedMKT: server LLM and client SLMs of another family", body,
           C.command_line(), write=not args.quick, notes=[
               "The FedMKT SLMs also see the public set's labels (the LM term of the "
               "distillation loss); local-only SLMs do not.",
               "Bytes: values float32 + token ids int32 per position and k, plus lengths and "
               "per-example CE (up only); LoRA FedAvg sends the adapter each way."],
           summary=[("FedMKT SLM accuracy: local-only -> after FedMKT",
                     f"{C.fmt(mean(slm_local))} -> {C.fmt(mean(slm_fed))}"),
                    ("FedMKT LLM accuracy: zero-shot / after FedMKT / central",
                     f"{C.fmt(recs[0]['server_accuracy'])} / "
                     f"{C.fmt(last['server_accuracy'])} / {C.fmt(central['accuracy'])}"),
                    ("FedMKT bytes up per client-round vs SLM LoRA FedAvg",
                     f"{C.fmt(up)} vs {C.fmt(lora_bytes)}")])


if __name__ == "__main__":
    main()
