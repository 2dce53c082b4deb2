"""Memory of the base model in fp32 vs 8-bit vs 4-bit (nf4) on CPU, and a LoRA step.

Every measurement runs in a fresh Python subprocess (so one quantization's allocations
never count towards another's) and uses the package's own loader
(``models.load_base_model(..., quantization=...)``, bitsandbytes underneath):

- load: peak RSS of the process (``resource.getrusage().ru_maxrss``), the RSS after the
  imports (baseline) and after loading, and the model's own ``get_memory_footprint()``;
- train (optional): the same model wrapped with LoRA r=8 on all linear layers
  (``models.wrap_peft``, k-bit preparation for 8/4-bit) and trained with
  ``train.train_local`` on real BBC News batches; the peak RSS during training only
  (VmHWM reset through ``/proc/self/clear_refs`` after loading) and the seconds per step.

Repetitions are interleaved (fp32, 8bit, 4bit, fp32, ...) and medians reported.

Example::

    python benchmarks/homo_memory.py                 # load + train, ~3-5 min
    python benchmarks/homo_memory.py --no-train --repeats 1
    python benchmarks/homo_memory.py --model tiny    # quick check
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import _common as C

MODES = ("none", "8bit", "4bit")
LABEL = {"none": "fp32", "8bit": "8-bit (LLM.int8)", "4bit": "4-bit (nf4)"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct",
                   help="model ref, or 'tiny' for a tiny random Llama (quick check only)")
    p.add_argument("--modes", default="none,8bit,4bit",
                   help="comma-separated quantizations (none = fp32)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per mode (load)")
    p.add_argument("--no-train", action="store_true", help="skip the LoRA training rows")
    p.add_argument("--train-modes", default="none,8bit,4bit",
                   help="quantizations for the LoRA training rows")
    p.add_argument("--train-repeats", type=int, default=3, help="fresh processes per mode "
                   "(train)")
    p.add_argument("--steps", type=int, default=4,
                   help="LoRA optimizer steps per training process (first is warm-up)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--child-task", default="load", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- child side


def _trimmed_rss() -> float:
    """RSS after glibc's ``malloc_trim(0)``: freed heap pages handed back to the OS, so
    what remains is live memory rather than allocator retention (e.g. freed fp32 copies)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return float("nan")
    return C.status_mb("VmRSS")


def _mapped_resident_mb(suffix: str) -> float:
    """Resident MB of this process's file mappings whose path ends with ``suffix``."""
    total, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                current = line.rstrip().endswith(suffix)
            elif current and line.startswith("Rss:"):
                total += int(head[1])
    return total / 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import bitsandbytes  # noqa: F401  (imported before the baseline, like the loader does)
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    from fatellm_flwr.models import count_parameters, load_base_model, load_tokenizer

    quant = args.child
    model_ref = C.resolve_model_arg(args.model)
    from fatellm_flwr.models import check_quantization_support

    check_quantization_support(quant)
    rss_base = C.status_mb("VmRSS")
    anon_base = C.status_mb("RssAnon")
    t0 = time.perf_counter()
    model = load_base_model(model_ref, quantization=quant)
    out = {"mode": quant, "load_s": time.perf_counter() - t0,
           "rss_baseline_mb": rss_base, "anon_baseline_mb": anon_base,
           "rss_after_load_mb": C.status_mb("VmRSS"),
           "peak_load_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "footprint_mb": model.get_memory_footprint() / 2**20,
           "params": count_parameters(model)[1]}
    # weights may still be lazily mapped from the safetensors file: one short forward
    # pass touches every weight, giving the RSS of a model ready to use
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            model(input_ids=torch.ones((1, 32), dtype=torch.long))
    except RuntimeError as e:  # e.g. bitsandbytes' CPU nf4 path needs in_features >= 64
        out["forward_error"] = f"{type(e).__name__}: {e}"
        print(f"forward pass failed: {e}", file=sys.stderr)
    out["forward_s"] = time.perf_counter() - t0
    out["rss_after_forward_mb"] = C.status_mb("VmRSS")
    out["peak_forward_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_after_trim_mb"] = _trimmed_rss()
    out["anon_after_trim_mb"] = C.status_mb("RssAnon")
    out["file_after_trim_mb"] = C.status_mb("RssFile")
    out["weights_file_resident_mb"] = _mapped_resident_mb(".safetensors")
    if args.child_task == "train":
        from fatellm_flwr.data import split_pool_and_test, tokenize_dataset
        from fatellm_flwr.models import wrap_peft
        from fatellm_flwr.train import train_local

        cfg = C.app_config({"model": model_ref, "quantization": quant, "peft-method": "lora",
                            "lora-r": 8, "target-modules": "", "max-examples": 120,
                            "test-size": 20, "max-length": args.max_length,
                            "batch-size": args.batch_size, "grad-accum": 1})
        tok = load_tokenizer(model_ref)
        task_data, pool, _, _ = split_pool_and_test(cfg)
        train = tokenize_dataset(pool, tok, cfg, task_data)
        torch.manual_seed(cfg.seed)
        model = wrap_peft(model, cfg, quant)
        out["trainable"] = count_parameters(model)[0]
        out["rss_before_train_mb"] = C.status_mb("VmRSS")
        out["peak_reset"] = _reset_peak()
        times = []
        for i in range(args.steps):  # one step per call: per-step wall times
            t = time.perf_counter()
            train_local(model, train, cfg, steps=1, pad_id=tok.pad_token_id, seed=cfg.seed + i)
            times.append(time.perf_counter() - t)
        out["step_s"] = times
        out["peak_train_mb"] = C.status_mb("VmHWM")
        out["peak_process_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- parent side
def spawn(args: argparse.Namespace, mode: str, task: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--child-task", task,
           "--model", args.model, "--steps", str(args.steps), "--batch-size",
           str(args.batch_size), "--max-length", str(args.max_length), "--threads",
           str(args.threads)]
    return C.run_child(cmd, f"{mode}/{task}")


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    t_start = time.perf_counter()
    load: dict[str, list[dict]] = {m: [] for m in modes}
    for rep in range(args.repeats):
        for m in modes:  # interleaved: fp32, 8bit, 4bit, fp32, ...
            r = spawn(args, m, "load")
            load[m].append(r)
            print(f"[memory] load {m} rep {rep}: peak {r['peak_load_mb']:.0f} MB, "
                  f"after forward {r['rss_after_forward_mb']:.0f} MB (peak "
                  f"{r['peak_forward_mb']:.0f}, trimmed {r['rss_after_trim_mb']:.0f}), "
                  f"footprint {r['footprint_mb']:.0f} MB",
                  flush=True)
    med = {m: {k: C.median([r[k] for r in load[m]]) for k in
               ("peak_load_mb", "peak_forward_mb", "rss_baseline_mb", "rss_after_load_mb",
                "rss_after_forward_mb", "rss_after_trim_mb", "anon_after_trim_mb",
                "anon_baseline_mb",
                "file_after_trim_mb", "weights_file_resident_mb", "footprint_mb", "load_s")}
           for m in modes}
    ref = med.get("none")
    rows = []
    for m in modes:
        x = med[m]
        added = x["rss_after_forward_mb"] - x["rss_baseline_mb"]
        ref_added = (ref["rss_after_forward_mb"] - ref["rss_baseline_mb"]) if ref else None
        live = x["rss_after_trim_mb"] - x["rss_baseline_mb"]
        ref_live = (ref["rss_after_trim_mb"] - ref["rss_baseline_mb"]) if ref else None
        rows.append([LABEL[m], round(x["footprint_mb"], 1),
                     f"{x['footprint_mb'] / ref['footprint_mb']:.2f}" if ref else "-",
                     round(x["rss_baseline_mb"]), round(x["rss_after_load_mb"]),
                     round(x["rss_after_forward_mb"]), round(added),
                     f"{added / ref_added:.2f}" if ref_added else "-",
                     round(live), f"{live / ref_live:.2f}" if ref_live else "-",
                     round(x["anon_after_trim_mb"] - x["anon_baseline_mb"]),
                     f"{(x['anon_after_trim_mb'] - x['anon_baseline_mb']) / (ref['anon_after_trim_mb'] - ref['anon_baseline_mb']):.2f}"  # noqa: E501
                     if ref else "-",
                     round(x["weights_file_resident_mb"]),
                     round(x["peak_load_mb"]), round(x["peak_forward_mb"]),
                     f"{x['peak_forward_mb'] / ref['peak_forward_mb']:.2f}" if ref else "-",
                     round(x["load_s"], 1)])
    load_table = C.markdown_table(
        ["base model", "get_memory_footprint (MB)", "footprint vs fp32",
         "RSS after imports (MB)", "RSS after load (MB)", "RSS after 1 forward (MB)",
         "RSS added by model (MB)", "added vs fp32", "added after malloc_trim (MB)",
         "trimmed vs fp32", "anon (private) RSS added (MB)", "anon added vs fp32",
         "safetensors file pages resident (MB)", "peak RSS after load, ru_maxrss (MB)",
         "peak RSS after 1 forward, ru_maxrss (MB)", "peak vs fp32", "load (s)"], rows)

    train_table = ""
    summary = [("base-model weights fp32 / 8-bit / 4-bit (get_memory_footprint, CPU)",
                " / ".join(f"{med[m]['footprint_mb']:.0f}" for m in modes) + " MB ("
                + ", ".join(f"{med[m]['footprint_mb'] / ref['footprint_mb']:.2f}x"
                            for m in modes if ref and m != "none") + "; the weights' bytes, "
                "the same in every repetition)")] if ref else []
    if not args.no_train:
        tmodes = [m.strip() for m in args.train_modes.split(",") if m.strip()]
        train: dict[str, list[dict]] = {m: [] for m in tmodes}
        for rep in range(args.train_repeats):
            for m in tmodes:
                r = spawn(args, m, "train")
                train[m].append(r)
                print(f"[memory] train {m} rep {rep}: peak during training "
                      f"{r['peak_train_mb']:.0f} MB, steps {[round(s, 2) for s in r['step_s']]}",
                      flush=True)
        tref = train.get("none")
        trows = []
        for m in tmodes:
            peak = C.median([r["peak_train_mb"] for r in train[m]])
            proc_peak = C.median([r["peak_process_mb"] for r in train[m]])
            steps = [s for r in train[m] for s in r["step_s"][1:]] or \
                [s for r in train[m] for s in r["step_s"]]
            ref_peak = C.median([r["peak_train_mb"] for r in tref]) if tref else None
            ref_steps = ([s for r in tref for s in r["step_s"][1:]] or
                         [s for r in tref for s in r["step_s"]]) if tref else None
            trows.append([LABEL[m], train[m][0]["trainable"],
                          round(C.median([r["rss_before_train_mb"] for r in train[m]])),
                          round(peak), f"{peak / ref_peak:.2f}" if ref_peak else "-",
                          round(proc_peak), round(C.median(steps), 2),
                          f"{C.median(steps) / C.median(ref_steps):.2f}" if ref_steps else "-"])
        train_table = C.markdown_table(
            ["LoRA r=8 training", "trainable params", "RSS before training (MB)",
             "peak RSS during training (MB)", "peak vs fp32", "process peak ru_maxrss (MB)",
             "s/step (median)", "s/step vs fp32"], trows)
        if tref:  # per repetition: mode m's process against the fp32 process of that rep
            spreads = {m: [r["peak_train_mb"] / f["peak_train_mb"]
                           for r, f in zip(train[m], tref)] for m in tmodes if m != "none"}
            train_table += "\n\nPeak RSS during training vs fp32, per repetition: " + \
                "; ".join(f"{LABEL[m]} {C.fmt_spread(v)}" for m, v in spreads.items()) + "."
            summary.append((
                "LoRA training peak RSS fp32 / 8-bit / 4-bit (CPU)",
                " / ".join(f"{C.median([r['peak_train_mb'] for r in train[m]]) / 1024:.1f}"
                           for m in tmodes)
                + " GiB (MB in the tables are MiB); vs fp32 per repetition: "
                + "; ".join(f"{m} {C.fmt_spread(v)}" for m, v in spreads.items())
                + f". On CPU activations dominate, so quantization saves weights, not "
                f"training peak; load {C.load_avg()}"))
    body = (f"Model `{args.model}`, CPU, {args.threads} torch threads per child, each row a "
            f"fresh subprocess; medians of {args.repeats} interleaved load repetitions"
            + ("" if args.no_train else
               f" and {args.train_repeats} training process(es) per mode of {args.steps} "
               f"steps (batch {args.batch_size} x max length {args.max_length}, BBC News; "
               "first step excluded from s/step)")
            + ".\n\nBase model loaded alone:\n\n" + load_table
            + ("\n\nLoRA training (peak RSS measured after loading, while training):\n\n"
               + train_table if train_table else ""))
    notes = [
        "`get_memory_footprint()` counts parameters + buffers (the weights' bytes); RSS also "
        "holds the Python/torch/transformers/bitsandbytes runtime (the 'after imports' "
        "column) and allocator slack. An fp32 load can leave weights lazily mapped from "
        "the safetensors file (not yet resident), hence the RSS after one 32-token forward "
        "pass, which touches every weight. Peak RSS of 8/4-bit includes transient fp32 "
        "copies (weights are read in fp32 and quantized on load); glibc keeps much of that "
        "freed heap mapped, which `malloc_trim(0)` returns to the OS ('after malloc_trim' "
        "= memory the process really still uses). transformers keeps the "
        "safetensors file memory-mapped: in fp32 the weights *are* those mapped pages "
        "(zero-copy), while after 8/4-bit quantization the fp32 pages read during "
        "quantization stay resident as clean page cache (the unquantized tied embedding "
        "still points into the mapping). Those pages count in RSS but the kernel can drop "
        "them under memory pressure, so compare 'anon (private) RSS added' for what "
        "quantization saves in memory that cannot be reclaimed.",
        "bitsandbytes quantizes only the linear layers of the blocks: the input embedding "
        "(tied to the LM head; 49,152 x 576 = 28.3M of SmolLM2's 134.5M parameters) and the "
        "norms stay in fp32, so the saving is smaller on this small model than on a 7B one.",
        "Training RSS is dominated by activations and their gradients at this model size, "
        "and bitsandbytes' CPU kernels dequantize on the fly, so quantization saves weight "
        "memory but not necessarily training peak or time on CPU.",
        f"Took {time.perf_counter() - t_start:.0f}s.",
    ]
    C.emit("homo_memory", "Base-model memory: fp32 vs 8-bit vs 4-bit (nf4), CPU", body,
           C.command_line(), notes, summary=summary)


if __name__ == "__main__":
    main()
