"""FedKSeed communication, replay time and quality vs LoRA FedAvg and full-parameter FedAvg.

1. Bytes per client-round, up and down, at ``--steps`` local steps (default 200, the
   paper's setting) with ``--clients`` clients per round and K = ``--k`` seeds:

   - FedKSeed: the real protocol code runs for ``--rounds`` rounds without a model
     (:class:`~fatellm_flwr.strategies.fedkseed.SeedServer` aggregates, builds each node's
     download; the client-side encoders build the uploads; seeds are sampled with the
     decoded probabilities), with synthetic scalar gradients g ~ N(0, 1) (bytes do not
     depend on g's values; the sampling skew they cause is at most e x between seeds).
     Payload bytes = ``sum(len(t) for t in ndarrays_to_parameters(arrays).tensors)``, what
     the strategy's ledger counts; "message" bytes = the whole Flower message content
     (``recorddict_to_proto(fitins_to_recorddict(...))``: arrays + config + metrics).
   - LoRA FedAvg (r = ``--lora-r``, all linear layers found from the model) and full FedAvg:
     the real trainable state of the model serialised with ``ndarrays_to_parameters``
     (the same bytes travel down and up).

2. Time: a few real ZO steps (:func:`fatellm_flwr.zo.zo_step`) on the model with short
   sequences, and real z generation (:func:`~fatellm_flwr.zo.apply_seed_updates` on a few
   seeds), extrapolated (clearly labelled) to a round of ``--steps`` steps and to the
   replay of the seeds that changed in a round / of every seed used (fresh process).

3. Quality (``--quality``): FedKSeed and LoRA FedAvg through `flwr run` in the simulation
   engine with the same rounds and clients on a builtin dataset (small scale).

Examples::

    python benchmarks/fedkseed_comm.py                       # SmolLM2-135M, bytes + time
    python benchmarks/fedkseed_comm.py --model tiny           # quick check
    python benchmarks/fedkseed_comm.py --quality --quality-model tiny
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import _common as C
import numpy as np

PAPER_KB = 18


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct",
                   help="model ref, or 'tiny' for a tiny random Llama")
    p.add_argument("--steps", type=int, default=200, help="local steps per round")
    p.add_argument("--clients", type=int, default=3, help="clients per round")
    p.add_argument("--more-clients", type=int, default=10,
                   help="a second FedKSeed row with this many clients per round (0 = off)")
    p.add_argument("--k", type=int, default=4096, help="candidate seeds K")
    p.add_argument("--rounds", type=int, default=10, help="protocol rounds simulated")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--timing-steps", type=int, default=3, help="real ZO steps timed (0 = skip)")
    p.add_argument("--timing-seeds", type=int, default=4, help="seeds replayed to time z")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence when timing")
    p.add_argument("--batch", type=int, default=2, help="sequences per batch when timing")
    p.add_argument("--quality", action="store_true", help="also run the quality comparison")
    p.add_argument("--quality-model", default="tiny",
                   help="model of the quality runs ('tiny' or a model ref)")
    p.add_argument("--quality-dataset", default="builtin:bbc-news")
    p.add_argument("--quality-rounds", type=int, default=3)
    p.add_argument("--quality-steps", type=int, default=20)
    p.add_argument("--quality-examples", type=int, default=300)
    p.add_argument("--quality-zo-lr", type=float, default=1e-3)
    p.add_argument("--quality-zo-eps", type=float, default=1e-3)
    p.add_argument("--quality-lr", type=float, default=1e-3, help="AdamW lr of LoRA FedAvg")
    p.add_argument("--no-write", action="store_true", help="print only, no results file")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- bytes
def payload_nbytes(arrays) -> int:
    from flwr.common import ndarrays_to_parameters

    return int(sum(len(t) for t in ndarrays_to_parameters(list(arrays)).tensors))


def message_nbytes(arrays, config: dict, fit_res_metrics: dict | None = None) -> int:
    """Bytes of the whole Flower message content (arrays + config, or + metrics for a reply)."""
    from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters
    from flwr.common.serde import recorddict_to_proto
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict, fitres_to_recorddict

    params = ndarrays_to_parameters(list(arrays))
    if fit_res_metrics is None:
        rd = fitins_to_recorddict(FitIns(params, config), keep_input=True)
    else:
        rd = fitres_to_recorddict(FitRes(Status(Code.OK, ""), params, 100, fit_res_metrics),
                                  keep_input=True)
    return len(recorddict_to_proto(rd).SerializeToString())


def fedkseed_protocol(k: int, clients: int, steps: int, rounds: int, seed: int = 0) -> dict:
    """Run the real FedKSeed payload code for ``rounds`` rounds (no model): per-round bytes."""
    from fatellm_flwr.strategies.fedkseed import SeedServer
    from fatellm_flwr.wire.fedkseed import (
        KEY_RUN,
        decode_probabilities,
        encode_probabilities,
        encode_upload,
    )
    from fatellm_flwr.zo import sample_seed_indices

    rng = np.random.default_rng(seed)
    server = SeedServer(k, lr=1e-5)
    nodes = [str(i) for i in range(clients)]
    rows = []
    metrics = {"partition-id": 0, "local_steps": steps, "zo_steps": float(steps),
               "train_loss": 1.0, "zo_replay_s": 0.1, "zo_train_s": 1.0}
    for rnd in range(1, rounds + 1):
        probs = encode_probabilities(server.history)
        p = decode_probabilities(probs, k)
        down, down_msg, up, up_msg, uploads = [], [], [], [], []
        for cid in nodes:
            arrays, config = server.download(cid, probs)
            config = {"server-round": rnd, KEY_RUN: "0123456789ab", **config}
            down.append(payload_nbytes(arrays))
            down_msg.append(message_nbytes(arrays, config))
            idx = sample_seed_indices(p, steps, rng)
            g = rng.normal(size=steps)
            sent = encode_upload(idx, g)
            up.append(payload_nbytes(sent))
            up_msg.append(message_nbytes(sent, {}, metrics))
            uploads.append((idx, g, 100))
        for cid in nodes:
            server.synced(cid, server.version)
        delta = server.aggregate(uploads)
        full, fconfig = server.download("a-node-the-server-does-not-know",
                                        encode_probabilities(server.history))
        rows.append({"round": rnd, "down": statistics.median(down),
                     "down_msg": statistics.median(down_msg), "up": statistics.median(up),
                     "up_msg": statistics.median(up_msg),
                     "seeds_changed": int(np.count_nonzero(delta)),
                     "seeds_used": int(np.count_nonzero(server.history.counts)),
                     "full_resend": payload_nbytes(full),
                     "full_resend_msg": message_nbytes(full, {"server-round": rnd + 1,
                                                              KEY_RUN: "0123456789ab",
                                                              **fconfig})})
    return {"rows": rows, "k": k, "clients": clients, "steps": steps}


def state_bytes(model) -> tuple[int, int]:
    """``(serialised bytes, tensors)`` of the model's trainable state, one tensor at a time."""
    total, n = 0, 0
    for _, p in model.named_parameters():
        if p.requires_grad:
            total += payload_nbytes([p.detach().float().numpy()])
            n += 1
    return total, n


def comm_section(args, model_ref: str) -> tuple[str, dict]:
    import torch

    from fatellm_flwr.models import count_parameters, load_base_model, wrap_peft
    from fatellm_flwr.zo import zo_parameters

    t0 = time.perf_counter()
    base = load_base_model(model_ref)
    for p in base.parameters():
        p.requires_grad_(True)
    _, total = count_parameters(base)
    tuned = sum(p.numel() for _, p in zo_parameters(base, exclude_embeddings=True))
    full_bytes, full_tensors = state_bytes(base)
    cfg = C.app_config({"model": model_ref, "peft-method": "lora", "lora-r": args.lora_r,
                        "target-modules": ""})
    torch.manual_seed(0)
    lora = wrap_peft(base, cfg)
    lora_bytes, lora_tensors = state_bytes(lora)
    del base, lora
    gc.collect()
    load_s = time.perf_counter() - t0

    proto = fedkseed_protocol(args.k, args.clients, args.steps, args.rounds)
    more = (fedkseed_protocol(args.k, args.more_clients, args.steps, args.rounds, seed=1)
            if args.more_clients else None)

    def steady(pr, key):
        return statistics.median(r[key] for r in pr["rows"][1:])

    paper = PAPER_KB * 1024
    rows = []

    def add(name, down, up, down_msg="", up_msg=""):
        tot = down + up
        pct = 100 * tot / (2 * full_bytes)
        rows.append([name, int(down), int(up), int(tot),
                     f"{pct:.1f}%" if pct >= 1 else f"{pct:.2g}%",
                     f"{full_bytes * 2 / tot:,.0f}x" if tot else "inf",
                     "yes" if tot < paper else "no",
                     "" if down_msg == "" else f"{int(down_msg):,} / {int(up_msg):,}"])

    r1 = proto["rows"][0]
    last = proto["rows"][-1]
    add(f"FedKSeed, round 1 (x0, uniform sampling), {args.clients} clients",
        r1["down"], r1["up"], r1["down_msg"], r1["up_msg"])
    add(f"FedKSeed, rounds 2-{args.rounds}, known node, {args.clients} clients/round",
        steady(proto, "down"), steady(proto, "up"), steady(proto, "down_msg"),
        steady(proto, "up_msg"))
    add(f"FedKSeed, full resend to an unknown node after {args.rounds} rounds",
        last["full_resend"], last["up"], last["full_resend_msg"], last["up_msg"])
    if more:
        add(f"FedKSeed, rounds 2-{args.rounds}, known node, {args.more_clients} clients/round",
            steady(more, "down"), steady(more, "up"), steady(more, "down_msg"),
            steady(more, "up_msg"))
    add(f"LoRA FedAvg r={args.lora_r}, all linear layers", lora_bytes, lora_bytes)
    add("full-parameter FedAvg", full_bytes, full_bytes)
    table = C.markdown_table(
        ["method", "bytes down", "bytes up", "total per client-round",
         "% of full FedAvg", "full FedAvg / method", f"< {PAPER_KB} KB",
         "Flower message bytes down / up"], rows)
    per_round = C.markdown_table(
        ["round", "down (payload)", "up (payload)", "seeds changed", "seeds used so far",
         "full resend (payload)"],
        [[r["round"], int(r["down"]), int(r["up"]), r["seeds_changed"], r["seeds_used"],
          int(r["full_resend"])] for r in proto["rows"]])
    body = (f"Model `{model_ref}`: {total:,} parameters ({full_tensors} tensors; full FedAvg "
            f"sends all of them), FedKSeed tunes {tuned:,} (input embeddings excluded, "
            f"`zo-exclude-embeddings=true`); LoRA r={args.lora_r} trains {lora_tensors} "
            f"tensors. {args.steps} local steps per round, K = {args.k} seeds, "
            f"{args.clients} clients per round.\n\n{table}\n\n"
            f"FedKSeed per round ({args.clients} clients, median over clients):\n\n{per_round}")
    info = {"proto": proto, "more": more, "full_bytes": full_bytes, "lora_bytes": lora_bytes,
            "tuned": tuned, "total": total, "load_s": load_s}
    return body, info


# --------------------------------------------------------------------------- time
def timing_section(args, model_ref: str, proto: dict) -> tuple[str, float, float, float]:
    """``(text, replay / training estimate, replay s, training s)``."""
    import torch

    from fatellm_flwr.models import load_base_model
    from fatellm_flwr.zo import apply_seed_updates, candidate_seeds, zo_step
    from fatellm_flwr.zo_model import ZoModel

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    t0 = time.perf_counter()
    model = load_base_model(model_ref).eval()
    load_s = time.perf_counter() - t0
    seeds = candidate_seeds(args.k, 42)
    zm = ZoModel(model, seeds, exclude_embeddings=True)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(0))

    def loss_fn():
        return model(input_ids=ids, labels=ids).loss

    with torch.no_grad():
        loss_fn()  # warm-up
        fwds = []
        for _ in range(3):
            t0 = time.perf_counter()
            loss_fn()
            fwds.append(time.perf_counter() - t0)
        fwd = statistics.median(fwds)
    t0 = time.perf_counter()
    for i in range(args.timing_steps):
        zo_step(zm.params, loss_fn, int(seeds[i]), eps=5e-4, lr=1e-5)
    step = (time.perf_counter() - t0) / args.timing_steps
    t0 = time.perf_counter()
    apply_seed_updates(zm.params, {int(s): 1e-6 for s in seeds[:args.timing_seeds]})
    z_seed = (time.perf_counter() - t0) / args.timing_seeds
    rows = proto["rows"]
    changed = statistics.median(r["seeds_changed"] for r in rows[1:])
    own = args.steps  # a client's own seeds, undone in the same pass (mostly among `changed`)
    used = rows[-1]["seeds_used"]
    train_round = args.steps * step
    table = C.markdown_table(
        ["quantity", "seconds", "how"],
        [["one forward (loss), measured", fwd,
          f"batch {args.batch} x {args.seq_len} tokens, median of 3"],
         ["one ZO step, measured", step, "2 forwards + 3 z generations over the tuned "
          f"tensors (mean of {args.timing_steps})"],
         ["one seed's z over all tuned tensors, measured", z_seed,
          f"apply_seed_updates on {args.timing_seeds} seeds / {args.timing_seeds}"],
         [f"local training per round, extrapolated ({args.steps} steps)", train_round,
          f"{args.steps} x ZO step"],
         [f"replay per round, caching client, extrapolated ({changed:.0f}-{changed + own:.0f} "
          "seeds)", changed * z_seed, f"seeds changed in the last round ({changed:.0f}, "
          f"{args.clients} clients) x z; its own <= {own} seeds are undone in the same pass "
          f"(upper bound {(changed + own) * z_seed:.4g} s)"],
         ["server: move its model per round, extrapolated", changed * z_seed,
          "seeds changed x z"],
         [f"fresh process: rebuild from x0 after {len(rows)} rounds, extrapolated "
          f"({used} seeds)", used * z_seed + load_s, f"model load ({load_s:.3g} s) + seeds used"
          " so far x z (<= K)"]])
    ratio = changed * z_seed / train_round
    return (f"Real ZO steps on `{model_ref}` ({len(zm.params)} tuned tensors), "
            f"torch threads {torch.get_num_threads()}; rows marked extrapolated multiply "
            f"measured unit costs.\n\n{table}\n\nReplay / local training per round (caching "
            f"client, {args.clients} clients), an **estimate extrapolated from unit costs**, "
            f"not measured end to end (`benchmarks/fedkseed_replay.py` measures it): "
            f"{ratio:.2f}. Independent of the machine: a "
            f"round's replay generates z for the seeds that changed (<= clients x steps, <= K: "
            f"{changed:.0f} here), local training generates 3 z per step ({3 * args.steps}) "
            f"plus 2 forwards per step, so replay costs less than training whenever <= 3 "
            f"clients train per round; with more clients it grows towards K z generations "
            f"(the paper's bound). Training at real lengths (e.g. batch 4 x 160 tokens) costs "
            f"more per step and replay does not change, so the measured ratio is an upper "
            f"bound for longer inputs. A fresh process (deployment runs one per message) "
            f"replays every seed used so far once: up to K z generations per round."), \
        ratio, changed * z_seed, train_round


# --------------------------------------------------------------------------- quality
def quality_section(args) -> tuple[str, list]:
    model = C.resolve_model_arg(args.quality_model)
    out = Path(tempfile.mkdtemp(prefix="fatellm-bench-fedkseed-"))
    common = {"model": model, "dataset": args.quality_dataset, "num-server-rounds":
              args.quality_rounds, "local-steps": args.quality_steps, "max-examples":
              args.quality_examples, "test-size": 60, "max-length": 96, "batch-size": 4,
              "min-fit-clients": 3, "min-available-clients": 3, "partitioner": "iid",
              "output-dir": str(out), "plots": False, "eval-batch-size": 8}
    arms = {"FedKSeed": {"algorithm": "fedkseed", "zo-lr": args.quality_zo_lr,
                         "zo-eps": args.quality_zo_eps},
            f"LoRA FedAvg r={args.lora_r}": {"algorithm": "homo", "peft-method": "lora",
                                            "lora-r": args.lora_r, "lr": args.quality_lr}}
    rows = []
    for name, extra in arms.items():
        run_name = extra["algorithm"]
        _, wall = C.run_flwr({**common, **extra, "run-name": run_name}, num_supernodes=3,
                             log_path=out / f"{run_name}.log")
        recs = C.read_metrics(out, run_name)
        first, last = recs[0], recs[-1]
        up = statistics.median(r["bytes_up_per_client"] for r in recs[1:])
        down = statistics.median(r["bytes_down_per_client"] for r in recs[1:])
        rows.append([name, first.get("server_loss"), last.get("server_loss"),
                     first.get("server_accuracy"), last.get("server_accuracy"), int(down),
                     int(up), wall])
    table = C.markdown_table(
        ["method", "loss round 0", f"loss round {args.quality_rounds}", "accuracy round 0",
         f"accuracy round {args.quality_rounds}", "median bytes down / client-round",
         "median bytes up / client-round", "wall s"], rows)
    return (f"`flwr run` (simulation engine, 3 clients, {args.quality_rounds} rounds, "
            f"{args.quality_steps} local steps, {args.quality_examples} examples of "
            f"`{args.quality_dataset}`, iid), model `{args.quality_model}`; FedKSeed zo-lr "
            f"{args.quality_zo_lr}, zo-eps {args.quality_zo_eps}; LoRA AdamW lr "
            f"{args.quality_lr}.\n\n{table}"), rows


def main(argv=None) -> str:
    args = parse_args(argv)
    model_ref = C.resolve_model_arg(args.model)
    t0 = time.perf_counter()
    comm, info = comm_section(args, model_ref)
    parts = ["## Bytes per client-round", "", comm]
    proto = info["proto"]
    steady_down = statistics.median(r["down"] for r in proto["rows"][1:])
    steady_up = statistics.median(r["up"] for r in proto["rows"][1:])
    resend = proto["rows"][-1]["full_resend"]
    full2, lora2 = 2 * info["full_bytes"], 2 * info["lora_bytes"]
    tot = steady_down + steady_up
    summary = [(
        f"bytes per client-round at {args.steps} local steps, K = {args.k}",
        f"up **{int(steady_up):,} B**; down {steady_down / 1000:.1f} KB in steady state "
        f"(sparse coefficient difference + seed scores), so **{tot / 1000:.1f} KB total**"
        f"{' < ' if tot < PAPER_KB * 1024 else ' >= '}{PAPER_KB} KB; a full resend to a node "
        f"that missed rounds {(resend + steady_up) / 1000:.1f} KB; LoRA FedAvg "
        f"{lora2 / 1e6:.1f} MB, full FedAvg {full2 / 1e9:.2f} GB ({full2 / tot:,.0f}x more); "
        f"byte counts of the real protocol code, exact")]
    if args.timing_steps > 0:
        text, ratio, replay_s, train_s = timing_section(args, model_ref, proto)
        parts += ["", "## Replay time vs local training time (estimate)", "", text]
        summary.append(("replay vs local training per round, **estimate**",
                        f"{ratio:.2f} ({replay_s:.0f} s vs {train_s:.0f} s), **extrapolated** "
                        f"from measured unit costs (one seed's z, one ZO step), not measured "
                        f"end to end: see fedkseed_replay for the measured figure"))
    if args.quality:
        text, qrows = quality_section(args)
        parts += ["", "## Quality at small scale", "", text]
        (_, l0, l1, a0, a1, *_), (_, m0, m1, b0, b1, *_) = qrows
        summary.append((
            f"quality vs LoRA FedAvg ({args.quality_dataset}, 3 clients, {args.quality_rounds}"
            f" rounds x {args.quality_steps} steps)",
            f"test loss {l0:.2f} -> **{l1:.2f}** (FedKSeed, zo-lr {args.quality_zo_lr:g}) vs "
            f"{m0:.2f} -> **{m1:.2f}** (LoRA); accuracy {a0:.2f} -> {a1:.2f} vs {b0:.2f} -> "
            f"{b1:.2f}. One run per arm"))
    notes = [
        "Protocol (strategies/fedkseed.py): up = [int32 seed indices, float32 g] of the "
        "non-skipped steps (8 bytes/step + 256 header bytes); down = the coefficient "
        "difference since the version the node holds (sparse uint16 index + float32 value, or "
        "dense float32 K, whichever is smaller) + the seed scores as uint8 (K bytes) from "
        "round 2 on. Nothing but config travels in round 1.",
        f"Steady-state down ({args.clients} clients x {args.steps} steps) is "
        f"{int(steady_down):,} bytes: ~6 bytes per seed changed in the last round + "
        f"{args.k + 128:,} bytes of seed scores. It grows with clients x steps per round "
        f"and is capped by 4K + K bytes (the full-resend row).",
        "A full resend (unknown node: first contact after the first round, after a failure "
        "or a resume) is the dense float32 vector once most seeds have been used: the "
        f"paper's ~16 KB, plus the scores; over {PAPER_KB} KB with the upload, but rare.",
        "FATE-LLM's FedKSeed sends a dict over all K seeds every round (O(K) both ways) and "
        "no final model; here bytes up are proportional to steps, not K.",
        "'Flower message bytes' are the serialised RecordDict (arrays + config or metrics); "
        "gRPC/HTTP framing is extra and the same for every method.",
        f"Took {time.perf_counter() - t0:.0f}s.",
    ]
    if args.no_write:
        text = "\n".join(parts)
        print(text)
        return text
    return C.emit("fedkseed_comm", "FedKSeed: communication, replay time, quality",
                  "\n".join(parts), C.command_line(), notes, summary=summary)


if __name__ == "__main__":
    main()
