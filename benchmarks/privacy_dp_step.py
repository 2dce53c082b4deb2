"""DP-SGD step time vs a non-DP step: same model, same LoRA adapters, same batch.

Two measurements, both with the package's own code:

1. **Isolated step, fixed batch** (the ratio asked for). One tokenized BBC News batch of
   ``--batch-size`` articles (all truncated to ``--max-length`` tokens, so every row has
   the full length) is reused for every step.

   - *non-DP*: exactly the inner loop of ``train.train_local``: ``train.causal_lm_loss``
     (HF's token-mean loss), ``backward``, ``clip_grad_norm_(max-grad-norm)``,
     ``AdamW.step``.
   - *DP*: ``privacy.dp.attach_dp_sgd`` on an identical copy of the model
     (``poisson_sampling=False``: the loader has fixed batches; ``grad_sample_mode`` hooks
     by default) and ``DPSession.step(batch)``: per-sequence loss, per-sample gradients,
     per-sample clipping, Gaussian noise, ``AdamW.step`` via Opacus' ``DPOptimizer``.

   The two steps run interleaved (A,B then B,A, ...) after warm-up; medians are reported.
2. **End to end, same expected batch** (``--e2e-steps`` > 0): ``train.train_local`` vs
   ``train.train_local_dp`` (Poisson sampling, expected batch ``--batch-size``) on the same
   partition for the same number of steps, interleaved; per-step time = call time / steps,
   so DP's per-round set-up (``make_private``) is included.

Torch runs with ``--threads`` threads (1 by default: what each simulated client gets).

Example::

    python benchmarks/privacy_dp_step.py                      # SmolLM2-135M, batch 4 x 128
    python benchmarks/privacy_dp_step.py --model tiny         # tiny random Llama, quick check
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import _common as C

NAME = "privacy_dp_step"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct",
                   help="model ref, or 'tiny' / 'tiny:<arch>' for a tiny random model")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--pairs", type=int, default=6, help="interleaved (non-DP, DP) step pairs")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps of each before timing")
    p.add_argument("--e2e-steps", type=int, default=4,
                   help="steps per train_local / train_local_dp call (0 = skip part 2)")
    p.add_argument("--e2e-pairs", type=int, default=3)
    p.add_argument("--grad-sample-mode", default="hooks", choices=("hooks", "functorch"))
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    t_start = time.perf_counter()
    import torch
    from torch.utils.data import DataLoader

    from fatellm_flwr.data import collate, split_pool_and_test, tokenize_dataset
    from fatellm_flwr.models import (
        count_parameters,
        get_trainable_state,
        load_peft_model,
        set_trainable_state,
    )
    from fatellm_flwr.privacy.dp import attach_dp_sgd
    from fatellm_flwr.train import causal_lm_loss, train_local, train_local_dp

    torch.set_num_threads(args.threads)
    # Opacus' hooks on a frozen first layer / its unseeded-RNG notice: expected, not news
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    model_ref = C.resolve_model_arg(args.model)
    n_rows = max(40, args.batch_size * 8)
    cfg = C.app_config({
        "model": model_ref, "dataset": "builtin:bbc-news", "peft-method": "lora",
        "lora-r": args.lora_r, "lora-dropout": 0.0, "max-length": args.max_length,
        "batch-size": args.batch_size, "grad-accum": 1, "max-examples": n_rows + 10,
        "test-size": 10, "lr": 1e-3, "max-grad-norm": 1.0, "seed": args.seed,
        "dp-sgd": True, "dp-noise-multiplier": args.noise_multiplier,
        "dp-target-epsilon": 0.0, "dp-max-grad-norm": 1.0, "num-server-rounds": 1,
        "local-steps": max(1, args.e2e_steps)})

    t0 = time.perf_counter()
    model, tok = load_peft_model(cfg)
    load_s = time.perf_counter() - t0
    trainable, total = count_parameters(model)
    task_data, pool, _, _ = split_pool_and_test(cfg)
    train_ds = tokenize_dataset(pool, tok, cfg, task_data)
    rows = train_ds.select_columns(["input_ids", "attention_mask", "labels"]).to_list()
    batch = collate(rows[:args.batch_size], tok.pad_token_id)
    seq = int(batch["input_ids"].shape[1])
    label_tokens = int((batch["labels"] != -100).sum())
    init = get_trainable_state(model)

    # ---------------------------------------------------------------- part 1: fixed batch
    plain_model = model
    dp_model = copy.deepcopy(model)
    plain_params = [p for p in plain_model.parameters() if p.requires_grad]
    plain_opt = torch.optim.AdamW(plain_params, lr=cfg.lr)
    dp_opt = torch.optim.AdamW([p for p in dp_model.parameters() if p.requires_grad],
                               lr=cfg.lr)
    loader = DataLoader(rows[:args.batch_size], batch_size=args.batch_size,
                        collate_fn=lambda b: collate(b, tok.pad_token_id))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # poisson_sampling=False: accounting approximate
        session = attach_dp_sgd(dp_model, dp_opt, loader, max_grad_norm=cfg.dp_max_grad_norm,
                                noise_multiplier=args.noise_multiplier, delta=1e-5,
                                poisson_sampling=False, grad_sample_mode=args.grad_sample_mode,
                                noise_generator=torch.Generator().manual_seed(args.seed))
    plain_model.train()

    def plain_step() -> float:
        t = time.perf_counter()
        plain_opt.zero_grad(set_to_none=True)
        loss = causal_lm_loss(plain_model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_params, cfg.max_grad_norm)
        plain_opt.step()
        return time.perf_counter() - t

    def dp_step() -> float:
        t = time.perf_counter()
        session.step(batch)
        return time.perf_counter() - t

    print(f"[dp-step] {args.model}: {trainable:,} trainable of {total:,}; batch "
          f"{args.batch_size} x {seq} tokens; {args.threads} thread(s); warm-up...", flush=True)
    for _ in range(args.warmup):
        plain_step()
        dp_step()
    plain_t, dp_t, pair_ratio = [], [], []
    for i in range(args.pairs):
        if i % 2 == 0:
            a = plain_step()
            b = dp_step()
        else:
            b = dp_step()
            a = plain_step()
        plain_t.append(a)
        dp_t.append(b)
        pair_ratio.append(b / a)
        print(f"[dp-step] pair {i}: non-DP {a:.3f}s, DP {b:.3f}s, ratio {b / a:.3f}",
              flush=True)
    session.close()
    session = None  # release the GradSampleModule hooks
    del dp_model, dp_opt

    part1 = C.markdown_table(
        ["measure", "non-DP step", "DP-SGD step", "DP / non-DP"],
        [["median (s)", C.median(plain_t), C.median(dp_t),
          C.median(dp_t) / C.median(plain_t)],
         ["min (s)", min(plain_t), min(dp_t), min(dp_t) / min(plain_t)],
         ["max (s)", max(plain_t), max(dp_t), max(dp_t) / max(plain_t)],
         ["per-pair ratios: median (min, max)", "", "", C.fmt_spread(pair_ratio)]])

    # ---------------------------------------------------------------- part 2: end to end
    part2 = ""
    e2e_plain, e2e_dp, e2e_ratio = [], [], []
    if args.e2e_steps > 0:
        train_small = train_ds.select(range(min(len(train_ds), n_rows)))
        pad = tok.pad_token_id
        for i in range(args.e2e_pairs):
            order = ("plain", "dp") if i % 2 == 0 else ("dp", "plain")
            for which in order:
                set_trainable_state(model, init)
                torch.manual_seed(args.seed + i)
                t = time.perf_counter()
                if which == "plain":
                    train_local(model, train_small, cfg, steps=args.e2e_steps, pad_id=pad,
                                seed=args.seed + i)
                    e2e_plain.append((time.perf_counter() - t) / args.e2e_steps)
                else:
                    m, _ = train_local_dp(model, train_small, cfg, steps=args.e2e_steps,
                                          pad_id=pad, seed=args.seed + i)
                    e2e_dp.append((time.perf_counter() - t) / args.e2e_steps)
                    dp_examples = m["train_examples"]
            print(f"[dp-step] e2e pair {i}: train_local {e2e_plain[-1]:.3f}s/step, "
                  f"train_local_dp {e2e_dp[-1]:.3f}s/step", flush=True)
        e2e_ratio = [d / p for p, d in zip(e2e_plain, e2e_dp)]
        part2 = C.markdown_table(
            ["measure", "train_local (s/step)", "train_local_dp (s/step)", "DP / non-DP"],
            [["median", C.median(e2e_plain), C.median(e2e_dp),
              C.median(e2e_dp) / C.median(e2e_plain)],
             ["min", min(e2e_plain), min(e2e_dp), min(e2e_dp) / min(e2e_plain)],
             ["max", max(e2e_plain), max(e2e_dp), max(e2e_dp) / max(e2e_plain)],
             ["per-pair ratios: median (min, max)", "", "",
              C.fmt_spread(e2e_ratio)]])
        part2 = (f"**2. End to end, same expected batch** ({args.e2e_pairs} interleaved pairs "
                 f"of `train_local` / `train_local_dp` calls of {args.e2e_steps} steps each on "
                 f"{len(train_small)} tokenized articles; DP batches Poisson with expected size "
                 f"{args.batch_size}, expected examples/call {dp_examples:g}; per-step time "
                 "includes each call's set-up: optimizer, and for DP `make_private`):\n\n"
                 + part2)

    body = "\n\n".join(x for x in [
        f"Model `{args.model}` ({total:,} parameters), LoRA r={args.lora_r} on all linear "
        f"layers, dropout 0 ({trainable:,} trainable). Batch {args.batch_size} BBC News "
        f"articles x {seq} tokens (loss on {label_tokens} label tokens), AdamW lr {cfg.lr}, "
        f"fp32, {args.threads} torch thread(s). DP: Opacus via `attach_dp_sgd`, "
        f"grad_sample_mode={args.grad_sample_mode}, per-sample clip 1.0, noise multiplier "
        f"{args.noise_multiplier}, Poisson sampling off (fixed batch) in part 1.",
        f"**1. Isolated step, fixed batch** ({args.warmup} warm-up step(s) each, then "
        f"{args.pairs} interleaved pairs):", part1,
        "Per pair (non-DP s / DP s = ratio): " + "; ".join(
            f"{a:.3g} / {b:.3g} = {b / a:.2f}" for a, b in zip(plain_t, dp_t)) + ".",
        part2] if x)
    notes = [
        "Both sides use identical weights and the same batch; the DP side is a deep copy of "
        "the same PEFT model wrapped by Opacus' GradSampleModule (so the non-DP side never "
        "pays for Opacus' hooks).",
        "Per-pair order alternates (non-DP first, then DP first) to cancel drift; the box's "
        "load changed during the run, so read the median ratio, not the absolute seconds.",
        f"Model load {load_s:.1f}s; whole script {time.perf_counter() - t_start:.0f}s.",
    ]
    lo, mid, hi = C.spread(pair_ratio)
    e2e = (f"; end to end with Poisson batches, per-pair ratios "
           f"{C.fmt_spread(e2e_ratio)} "
           f"({args.e2e_pairs} pairs)") if e2e_plain else ""
    summary = [(f"DP-SGD step vs non-DP step (Opacus hooks, LoRA, batch {args.batch_size} x "
                f"{seq} tokens)",
                f"**{mid:.2f}x** (median of {len(pair_ratio)} interleaved pairs' ratios; min "
                f"{lo:.2f}, max {hi:.2f}; 1-min load {C.load_avg()}){e2e}")]
    C.emit(NAME, "DP-SGD step time vs non-DP step (LoRA)", body, C.command_line(), notes,
           summary=summary)


if __name__ == "__main__":
    main()
