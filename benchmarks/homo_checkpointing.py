"""Gradient checkpointing (`gradient-checkpointing=true`): LoRA training peak RSS on CPU.

Same setup as the LoRA rows of ``benchmarks/homo_memory.py`` (SmolLM2-135M fp32, LoRA r=8
on all linear layers, BBC News batches of 4 x max length 160, 2 torch threads): each arm
runs in a fresh subprocess that loads the model, wraps it with the package's own
``models.wrap_peft`` (transformers' gradient checkpointing when the key is on), resets
the peak-RSS counter (``/proc/self/clear_refs``) and trains with ``train.train_local``;
the peak RSS during training (VmHWM) and the seconds per step are reported. Arms are
interleaved (off, on, off, on, ...).

    python benchmarks/homo_checkpointing.py                # SmolLM2, ~5-10 min on 2 cores
    python benchmarks/homo_checkpointing.py --model tiny --steps 2 --no-write
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=2, help="LoRA steps per process")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per arm")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from fatellm_flwr.data import split_pool_and_test, tokenize_dataset
    from fatellm_flwr.models import load_base_model, load_tokenizer, wrap_peft
    from fatellm_flwr.train import train_local

    ckpt = args.child == "on"
    model_ref = C.resolve_model_arg(args.model)
    cfg = C.app_config({"model": model_ref, "peft-method": "lora", "lora-r": 8,
                        "target-modules": "", "max-examples": 120, "test-size": 20,
                        "max-length": args.max_length, "batch-size": args.batch_size,
                        "grad-accum": 1, "gradient-checkpointing": ckpt, "device": "cpu"})
    tok = load_tokenizer(model_ref)
    task_data, pool, _, _ = split_pool_and_test(cfg)
    train = tokenize_dataset(pool, tok, cfg, task_data)
    model = load_base_model(model_ref, device="cpu")
    torch.manual_seed(cfg.seed)
    model = wrap_peft(model, cfg)
    inner = model.base_model.model
    assert inner.is_activation_checkpointing is ckpt  # transformers' own flag
    rss_before = C.status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS from here on
        f.write("5")
    times, losses = [], []
    for i in range(args.steps):
        t = time.perf_counter()
        m = train_local(model, train, cfg, steps=1, pad_id=tok.pad_token_id, seed=cfg.seed + i)
        times.append(time.perf_counter() - t)
        losses.append(m["train_loss"])
    print("RESULT " + json.dumps({"rss_before_mb": rss_before, "peak_mb": C.status_mb("VmHWM"),
                                  "step_s": times, "losses": losses}), flush=True)


def spawn(args: argparse.Namespace, arm: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", arm, "--model",
           args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--threads", str(args.threads)]
    return C.run_child(cmd, arm)


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    t0 = time.perf_counter()
    bench = C.Interleaved({"off": lambda rep: spawn(args, "off"),
                           "on": lambda rep: spawn(args, "on")}).run(args.repeats)
    rows = []
    for arm in ("off", "on"):
        rs = bench.results[arm]
        rows.append([f"gradient-checkpointing={'true' if arm == 'on' else 'false'}",
                     C.fmt_spread([r["rss_before_mb"] for r in rs], 4, " MB"),
                     C.fmt_spread([r["peak_mb"] for r in rs], 4, " MB"),
                     C.fmt_spread([t for r in rs for t in r["step_s"]], 3, " s"),
                     ", ".join(f"{x:.4f}" for x in rs[0]["losses"])])
    ratio = bench.ratios("on", "off", key=lambda r: r["peak_mb"])
    table = C.markdown_table(["LoRA r=8 training, fp32, CPU", "RSS before training",
                              "peak RSS during training", "s / step", "losses (1st process)"],
                             rows)
    notes = [f"`{args.model}`, batch {args.batch_size} x max length {args.max_length}, "
             f"{args.steps} steps per process, {args.repeats} process(es) per arm, "
             f"{args.threads} torch threads.",
             "Peak RSS on vs off (paired): " + C.fmt_spread(ratio, 3, "x") + ". Reference: "
             "benchmarks/results/homo_memory.md measured 3,383 MB peak for the fp32 LoRA "
             "row without checkpointing (same batch shape).",
             "Checkpointing recomputes each block's forward pass in the backward pass "
             "(transformers' non-reentrant implementation): activations of only one block "
             "are alive at a time, at the cost of ~1 extra forward per step.",
             bench.load_note(), f"Took {time.perf_counter() - t0:.0f}s."]
    peak = {arm: C.median([r["peak_mb"] for r in bench.results[arm]]) for arm in ("off", "on")}
    step = {arm: C.median([t for r in bench.results[arm] for t in r["step_s"]])
            for arm in ("off", "on")}
    summary = [("LoRA training peak RSS with gradient-checkpointing=true (CPU)",
                f"{peak['on']:,.0f} MB vs {peak['off']:,.0f} MB without "
                f"(**{peak['on'] / peak['off']:.2f}x**), {step['on'] / step['off']:.1f}x the "
                f"time per step, identical losses; {args.repeats} process(es) per arm")]
    C.emit("homo_checkpointing", "Gradient checkpointing: LoRA training memory on CPU", table,
           C.command_line(), notes, write=not args.no_write, summary=summary)


if __name__ == "__main__":
    main()
