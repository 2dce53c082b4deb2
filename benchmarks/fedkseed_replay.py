"""FedKSeed: a caching client's replay vs its local training per round, measured end to end.

One node is followed through ``--rounds`` real rounds of the FedKSeed protocol with
``--clients`` clients per round (3 and ``--more-clients``, 10 by default), in one process:

- the server is the real :class:`~fatellm_flwr.strategies.fedkseed.SeedServer`
  (aggregation, seed scores, the node's download as a coefficient difference);
- the followed node keeps its model between rounds (a caching client), decodes the
  download (``decode_coefficients``) and **replays** it for real: ``ZoModel.move_to`` moves
  its weights to the new global version, undoing its own booked local steps in the same
  pass (what ``FedKSeedClient.rebuild`` times as ``zo_replay_s``);
- it then **trains** for real: ``--steps`` ZO steps (``zo_step``: 2 forwards + 3 z
  generations each) on seeds drawn with the server's probabilities, and books them
  (what ``FedKSeedClient.fit`` times as ``zo_train_s``);
- the other clients' uploads are seed indices drawn with the same probabilities and
  synthetic scalar gradients g ~ N(0, 1) (which seeds change, not g's values, sets the
  replay's cost; their training would run on their own machines).

Replay / training is taken per round from round 2 on (round 1 starts from x0: nothing to
replay). The two client counts are interleaved (3, 10, 3, 10, ...) for ``--repeats``
repetitions, each a fresh model and protocol; min / median / max are reported with the
machine's load.

Model: by default a **scale model of SmolLM2-135M** (``smollm2/30``): SmolLM2's own config
with 1 of its 30 decoder blocks and 1/30 of its vocabulary, random weights. Each block's
tensors have SmolLM2's exact shapes, and tuned parameters (blocks; embeddings excluded)
and forward cost (blocks + tied head) shrink by the same factor, so the ratio of z
generation to forward cost, which sets replay / training, is SmolLM2's; absolute seconds
are ~1/30 of SmolLM2's. ``--model builtin:smollm2-135m-instruct`` runs the real model
(~30x longer); ``smollm2/N`` keeps 30/N blocks.

Example::

    python benchmarks/fedkseed_replay.py                 # ~5-8 min on 2 shared cores
    python benchmarks/fedkseed_replay.py --quick         # seconds: a smoke check
"""

from __future__ import annotations

import argparse
import copy
import time

import _common as C
import numpy as np

SMOLLM2 = "builtin:smollm2-135m-instruct"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2/30",
                   help="'smollm2/N' (SmolLM2's config, 30/N blocks, vocab/N, random weights)"
                        ", 'tiny', or a model ref")
    p.add_argument("--steps", type=int, default=200, help="local steps per round (paper: 200)")
    p.add_argument("--k", type=int, default=4096, help="candidate seeds K (paper: 4096)")
    p.add_argument("--clients", type=int, default=3, help="clients per round")
    p.add_argument("--more-clients", type=int, default=10, help="second arm's clients/round")
    p.add_argument("--rounds", type=int, default=3, help="rounds per run (>= 2)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
    p.add_argument("--batch", type=int, default=2, help="sequences per ZO forward")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 = what a simulated client gets)")
    p.add_argument("--no-write", action="store_true", help="print only, no results file")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, 20 steps, K=256, 2 rounds, 1 repetition; prints only")
    args = p.parse_args(argv)
    if args.quick:
        args.no_write = True
        args.model, args.steps, args.k, args.rounds, args.repeats = "tiny", 20, 256, 2, 1
    if args.rounds < 2:
        p.error("--rounds must be >= 2 (round 1 has nothing to replay)")
    return args


def build_model(ref: str):
    """``(model, description)`` for ``--model``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if ref.startswith("smollm2/"):
        from fatellm_flwr.assets import resolve_model_ref

        n = int(ref.split("/", 1)[1])
        cfg = AutoConfig.from_pretrained(resolve_model_ref(SMOLLM2))
        full_layers, full_vocab = cfg.num_hidden_layers, cfg.vocab_size
        cfg.num_hidden_layers = max(1, full_layers // n)
        cfg.vocab_size = max(256, full_vocab // n)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        desc = (f"scale model of SmolLM2-135M-Instruct: its config with "
                f"{cfg.num_hidden_layers} of {full_layers} blocks and vocabulary "
                f"{cfg.vocab_size} of {full_vocab}, random weights")
        return model, desc
    from fatellm_flwr.models import load_base_model

    model_ref = C.resolve_model_arg(ref)
    return load_base_model(model_ref), f"`{ref}`"


def run_arm(base, clients: int, args, seed: int) -> dict:
    """One fresh run: the followed node's replay and training seconds per round."""
    import torch

    from fatellm_flwr.strategies.fedkseed import SeedServer
    from fatellm_flwr.wire.fedkseed import (
        KEY_BASE,
        KEY_DELTA,
        decode_coefficients,
        decode_probabilities,
        encode_probabilities,
        split_download,
    )
    from fatellm_flwr.zo import candidate_seeds, sample_seed_indices, zo_step
    from fatellm_flwr.zo_model import ZoModel

    model = copy.deepcopy(base).eval()
    zm = ZoModel(model, candidate_seeds(args.k, 42), exclude_embeddings=True)
    server = SeedServer(args.k, lr=1e-6)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    node, held = "followed", np.zeros(args.k)
    rows = []
    for rnd in range(1, args.rounds + 1):
        probs = encode_probabilities(server.history)
        arrays, config = server.download(node, probs)
        coeff_arrays, q = split_download(arrays, config)
        delta = decode_coefficients(coeff_arrays, str(config[KEY_DELTA]), args.k)
        target = delta if int(config[KEY_BASE]) == 0 else held + delta
        t0 = time.perf_counter()
        replayed = zm.move_to(target)
        replay_s = time.perf_counter() - t0
        held = target
        p = decode_probabilities(q, args.k)
        picks = sample_seed_indices(p, args.steps, rng)
        kept_idx, kept_g = [], []
        t0 = time.perf_counter()
        for pick in picks:
            ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen)

            def loss_fn(ids=ids):
                return model(input_ids=ids, labels=ids).loss

            g = zo_step(zm.params, loss_fn, int(zm.seeds[pick]), eps=1e-3, lr=1e-6)
            if g is not None:
                kept_idx.append(int(pick))
                kept_g.append(g)
        zm.record_steps(kept_idx, kept_g, 1e-6)
        train_s = time.perf_counter() - t0
        uploads = [(np.asarray(kept_idx), np.asarray(kept_g), 100.0)]
        for _ in range(clients - 1):
            uploads.append((sample_seed_indices(p, args.steps, rng),
                            rng.normal(size=args.steps), 100.0))
        server.synced(node, server.version)
        changed = int(np.count_nonzero(server.aggregate(uploads)))
        rows.append({"round": rnd, "replay_s": replay_s, "train_s": train_s,
                     "replayed_seeds": replayed, "seeds_changed": changed})
    return {"rows": rows, "clients": clients}


def steady(run: dict, key: str) -> list[float]:
    return [r[key] for r in run["rows"] if r["round"] >= 2]


def main(argv=None) -> str:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    base, desc = build_model(args.model)
    from fatellm_flwr.zo import zo_parameters

    tuned = sum(p.numel() for _, p in zo_parameters(base, True))
    counts = [args.clients, args.more_clients] if args.more_clients else [args.clients]
    bench = C.Interleaved({f"{n} clients": (lambda rep, n=n: run_arm(base, n, args, 1000 * rep
                                                                     + n))
                           for n in counts}).run(args.repeats)

    rows, ratio_by_n = [], {}
    for n in counts:
        runs = bench.values(f"{n} clients")
        ratios = [r / t for run in runs for r, t in zip(steady(run, "replay_s"),
                                                        steady(run, "train_s"))]
        ratio_by_n[n] = C.spread(ratios)
        rows.append([n, C.fmt_spread([x for run in runs for x in steady(run, "replay_s")]),
                     C.fmt_spread([x for run in runs for x in steady(run, "train_s")]),
                     C.median([x for run in runs for x in steady(run, "replayed_seeds")]),
                     C.fmt_spread(ratios)])
    table = C.markdown_table(
        ["clients per round", "replay per round (s): median (min, max)",
         f"local training per round, {args.steps} ZO steps (s)",
         "seeds replayed (median)", "replay / training"], rows)
    per_round = C.markdown_table(
        ["clients", "rep", "round", "replay (s)", "training (s)", "seeds replayed",
         "replay / training"],
        [[n, rep, r["round"], round(r["replay_s"], 3), round(r["train_s"], 3),
          r["replayed_seeds"], "-" if r["round"] == 1 else f"{r['replay_s'] / r['train_s']:.3f}"]
         for n in counts for rep, run in enumerate(bench.values(f"{n} clients"))
         for r in run["rows"]])
    body = (f"Model: {desc}; {tuned:,} tuned parameters (embeddings and tied head "
            f"excluded, the default `zo-exclude-embeddings=true`). K = {args.k}, "
            f"{args.steps} local steps per round, batch {args.batch} x {args.seq_len} "
            f"tokens, {args.threads} torch thread(s); {args.rounds} rounds per run, "
            f"{args.repeats} interleaved repetitions; ratios from rounds 2..{args.rounds} "
            f"of every repetition. Everything below is measured (no extrapolation).\n\n"
            f"{table}\n\nPer round:\n\n{per_round}\n\n{bench.load_note()}")
    notes = [
        "Replay = `ZoModel.move_to` from the node's state after its own booked steps to the "
        "new global version (the seeds that changed last round, its own steps undone in "
        "the same pass); training = the node's ZO steps. Both as `FedKSeedClient` times "
        "them (`zo_replay_s`, `zo_train_s`).",
        "A caching client is a process that keeps its model between rounds (the simulation "
        "engine's actors; a deployment whose ClientApp process lives across messages). A "
        "fresh process per message replays every seed used so far (<= K) instead.",
        "Other clients' uploads use the real seed sampling with synthetic g: replay cost "
        "depends on which seeds changed, not on g's values.",
        f"Took {time.perf_counter() - t_start:.0f}s.",
    ]
    parts = []
    for n in counts:
        lo, mid, hi = ratio_by_n[n]
        parts.append(f"**{mid:.2f}** with {n} clients per round (min {lo:.2f}, max {hi:.2f})")
    same_overlap = (" (steps / K as the paper's 200 / 4096, so clients' seeds overlap "
                    "alike)") if args.steps * 4096 == args.k * 200 and args.k != 4096 else ""
    short = ("a 1/" + args.model.split("/", 1)[1] + " scale model of SmolLM2 (same block "
             "shapes)") if args.model.startswith("smollm2/") else f"`{args.model}`"
    summary = [(
        "replay vs local training per round (caching client), measured end to end",
        "; ".join(parts) + f": real `move_to` vs {args.steps} real ZO steps per round, "
        f"K = {args.k}, {args.repeats} interleaved repetitions x rounds "
        f"2..{args.rounds}, on {short}{same_overlap}. Replay grows with the seeds changed "
        f"per round (clients x steps, at most K); training does not")]
    text = C.emit("fedkseed_replay", "FedKSeed: replay vs local training per round, measured",
                  body, C.command_line(), notes, write=not args.no_write, summary=summary)
    if not args.no_write:
        import json

        (C.RESULTS / "fedkseed_replay.json").write_text(json.dumps(
            {"model": desc, "k": args.k, "steps": args.steps,
             "ratio": {str(n): dict(zip(("min", "median", "max"), v))
                       for n, v in ratio_by_n.items()},
             "repeats": args.repeats, "loads": bench.loads}, indent=2) + "\n")
    return text


if __name__ == "__main__":
    main()
