"""Offsite-tuning: client cost (emulator vs full model), bytes per round, quality.

Paper (Xiao, Lin, Han 2023): tuning the adapters on the emulator instead of fine-tuning the
full model is 6.5x faster and takes 5.6x less memory (their split, GPU), with plug-in
accuracy above zero-shot and close to full fine-tuning. What this script measures, on
SmolLM2-135M-Instruct (30 blocks) at the split ``--bottom/--top/--emulator-layers``:

1. memory: each configuration in a fresh subprocess on the same batch (real BBC News
   examples): peak RSS (``ru_maxrss``) of the whole process and the RSS added by loading
   and training on top of the imports. The emulator process rebuilds the emulator from
   the client payload (config + tensors) exactly as the client does; it never loads the
   full model;
2. time: one process holding every configuration, their optimizer steps interleaved on
   the same batch (noise on this shared box hits all of them alike); medians;
3. bytes: what the Flower run's ledger counted per client, round 1 (adapters + frozen
   emulator) and later rounds (adapters only), against the full model;
4. quality: ``flwr run .`` (simulation engine, ``--clients`` clients, ``--rounds`` rounds)
   with the four server-side numbers each round: full model zero-shot, emulator with the
   original adapters, emulator with the tuned adapters, plug-in (full model + tuned
   adapters); with ``--distill`` a second run with the distilled emulator.

Configurations (1, 2): full model with every parameter trained (the paper's full
fine-tuning baseline); full model with only the adapter blocks trained (same trainable
set as offsite); the emulator with the adapter blocks trained (an offsite client); the
emulator with LoRA on the adapter blocks (``offsite-lora``). AdamW everywhere.

Example::

    python benchmarks/offsite.py                       # SmolLM2, all parts
    python benchmarks/offsite.py --parts memory,time   # client cost only
    python benchmarks/offsite.py --model tiny:llama --quick   # smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import _common as C

CONFIGS = ("full-all", "full-adapters", "emulator", "emulator-lora")
LABEL = {"full-all": "full model, all parameters (full fine-tuning)",
         "full-adapters": "full model, adapter blocks only",
         "emulator": "emulator, adapter blocks (offsite client)",
         "emulator-lora": "emulator, LoRA r=8 on adapter blocks (offsite-lora)"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct",
                   help="model ref, or tiny[:arch] for a tiny random model (smoke test)")
    p.add_argument("--bottom", type=int, default=2)
    p.add_argument("--top", type=int, default=2)
    p.add_argument("--emulator-layers", type=int, default=6)
    p.add_argument("--parts", default="memory,time,quality")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="steps per memory process / per "
                   "configuration in the timing process (the first is a warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3,
                   help="memory: fresh processes per configuration, interleaved")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-examples", type=int, default=400)
    p.add_argument("--test-size", type=int, default=60)
    p.add_argument("--quality-max-length", type=int, default=192)
    p.add_argument("--distill", action="store_true", help="also a run with the distilled "
                   "emulator (builtin:chatterbot public text)")
    p.add_argument("--distill-steps", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    p.add_argument("--name", default="offsite", help="results file benchmarks/results/<name>.md")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.local_steps = 2, 1, 2
        args.max_examples, args.test_size, args.distill_steps = 60, 12, 3
    return args


# --------------------------------------------------------------------------- shared pieces
def _cfg(args, model_ref: str):
    return C.app_config({"algorithm": "offsite", "model": model_ref,
                         "offsite-bottom": args.bottom, "offsite-top": args.top,
                         "offsite-emulator-layers": args.emulator_layers,
                         "max-examples": 120, "test-size": 20, "max-length": args.max_length,
                         "batch-size": args.batch_size, "lr": args.lr, "lora-dropout": 0.0})


def _batch(cfg, tokenizer):
    """The same real batch for every configuration: the first pool examples of BBC News."""
    from fatellm_flwr.data import collate, split_pool_and_test, tokenize_dataset

    task_data, pool, _, _ = split_pool_and_test(cfg)
    rows = tokenize_dataset(pool.select(range(cfg.batch_size)), tokenizer, cfg, task_data)
    return collate(rows.select_columns(["input_ids", "attention_mask", "labels"]).to_list(),
                   tokenizer.pad_token_id)


def _prepare(args, work: Path) -> dict:
    """Save the client payload (emulator config + tensors) once: what a client receives."""
    from safetensors.torch import save_file

    from fatellm_flwr.emulator import build_emulator, client_payload
    from fatellm_flwr.models import load_base_model
    from fatellm_flwr.strategies.offsite import make_split

    model_ref = C.resolve_model_arg(args.model)
    cfg = _cfg(args, model_ref)
    full = load_base_model(model_ref)
    from fatellm_flwr.emulator import decoder_blocks

    split = make_split(cfg, len(decoder_blocks(full)))
    emu = build_emulator(full, split)
    payload = {k: v.contiguous() for k, v in client_payload(emu).items()}
    save_file(payload, str(work / "payload.safetensors"))
    (work / "arch.json").write_text(emu.config.to_json_string(use_diff=False))
    info = {"layers": split.num_layers, "kept": split.kept_indices(),
            "emulator": split.emulator_indices(), "dropped": split.dropped_indices(),
            "full_params": sum(p.numel() for p in full.parameters()),
            "emulator_params": sum(p.numel() for p in emu.parameters())}
    (work / "info.json").write_text(json.dumps(info))
    return info


def _load(name: str, args, work: Path):
    """``(model, trainable params, split)`` of one configuration (see CONFIGS)."""
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from fatellm_flwr.emulator import (
        decoder_blocks,
        emulator_from_payload,
        mark_adapters_trainable,
    )
    from fatellm_flwr.models import build_peft_config, load_base_model
    from fatellm_flwr.strategies.offsite import make_split
    from fatellm_flwr.wire.offsite import arch_config

    model_ref = C.resolve_model_arg(args.model)
    cfg = _cfg(args, model_ref)
    num_layers = json.loads((work / "info.json").read_text())["layers"]
    split = make_split(cfg, num_layers)
    if name.startswith("full"):
        model = load_base_model(model_ref)
        if name == "full-all":
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            blocks = decoder_blocks(model)
            for p in model.parameters():
                p.requires_grad_(False)
            for i in split.adapter_indices():
                for p in blocks[i].parameters():
                    p.requires_grad_(True)
    else:
        model = emulator_from_payload(arch_config((work / "arch.json").read_text()),
                                      load_file(str(work / "payload.safetensors")))
        if name == "emulator-lora":
            from peft import get_peft_model

            torch.manual_seed(0)
            pc = build_peft_config(cfg.replace(peft_method="lora"), model)
            model = get_peft_model(model, dataclasses.replace(
                pc, layers_to_transform=split.emulator_adapter_positions()))
        else:
            mark_adapters_trainable(model, split)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, cfg


def _step(model, opt, params, batch) -> float:
    import torch

    t = time.perf_counter()
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


# --------------------------------------------------------------------------- children
def child_memory(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from fatellm_flwr.models import load_tokenizer

    work = Path(args.work)
    name = args.child.split(":", 1)[1]
    tok = load_tokenizer(C.resolve_model_arg(args.model))
    rss0 = C.status_mb("VmRSS")
    model, params, cfg = _load(name, args, work)
    batch = _batch(cfg, tok)
    rss_loaded = C.status_mb("VmRSS")
    opt = torch.optim.AdamW(params, lr=1e-5)
    times = [_step(model, opt, params, batch) for _ in range(args.steps)]
    out = {"config": name, "rss_baseline_mb": rss0, "rss_loaded_mb": rss_loaded,
           "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "trainable": sum(p.numel() for p in params),
           "params": sum(p.numel() for p in model.parameters()), "step_s": times}
    print("RESULT " + json.dumps(out), flush=True)


def child_time(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from fatellm_flwr.models import load_tokenizer

    work = Path(args.work)
    tok = load_tokenizer(C.resolve_model_arg(args.model))
    runs = {}
    for name in CONFIGS:
        if name == "full-adapters":  # same weights as full-all, its own trainable set
            model = runs["full-all"][0]
            from fatellm_flwr.emulator import decoder_blocks
            from fatellm_flwr.strategies.offsite import make_split

            split = make_split(runs["full-all"][3], len(decoder_blocks(model)))
            blocks = decoder_blocks(model)
            params = [p for i in split.adapter_indices() for p in blocks[i].parameters()]
            runs[name] = (model, torch.optim.AdamW(params, lr=1e-5), params, None)
            continue
        model, params, cfg = _load(name, args, work)
        runs[name] = (model, torch.optim.AdamW(params, lr=1e-5), params, cfg)
    batch = _batch(runs["full-all"][3], tok)
    full = runs["full-all"][0]
    times: dict[str, list[float]] = {n: [] for n in CONFIGS}
    for i in range(args.steps + 1):
        order = CONFIGS[i % len(CONFIGS):] + CONFIGS[:i % len(CONFIGS)]  # rotate positions
        for name in order:
            model, opt, params, _ = runs[name]
            if model is full:  # toggle the trainable set of the shared full model
                chosen = {id(p) for p in params}
                for p in full.parameters():
                    p.requires_grad_(id(p) in chosen)
            dt = _step(model, opt, params, batch)
            if i > 0:
                times[name].append(dt)
    print("RESULT " + json.dumps({"step_s": times}), flush=True)


def spawn(args: argparse.Namespace, child: str, work: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", child, "--work",
           str(work)] + [a for a in sys.argv[1:] if not a.startswith("--child")]
    return C.run_child(cmd, child)


# --------------------------------------------------------------------------- quality
def quality_run(args, run_name: str, out_dir: Path, distill: bool) -> tuple[list, float]:
    model_ref = C.resolve_model_arg(args.model)
    run_config = {
        "algorithm": "offsite", "model": model_ref, "dataset": "builtin:bbc-news",
        "num-server-rounds": args.rounds, "local-steps": args.local_steps,
        "batch-size": args.batch_size, "lr": args.lr, "max-length": args.quality_max_length,
        "max-examples": args.max_examples, "test-size": args.test_size,
        "partitioner": "iid", "min-fit-clients": args.clients,
        "min-available-clients": args.clients, "offsite-bottom": args.bottom,
        "offsite-top": args.top, "offsite-emulator-layers": args.emulator_layers,
        "offsite-distill": distill, "offsite-distill-steps": args.distill_steps,
        "offsite-distill-lr": 1e-4, "save-every-round": False, "plots": False,
        "output-dir": str(out_dir), "run-name": run_name}
    _, wall = C.run_flwr(run_config, args.clients, num_cpus=1,
                         log_path=out_dir / f"{run_name}.log")
    return C.read_metrics(out_dir, run_name), wall


def quality_table(records: list[dict]) -> str:
    rows = []
    for r in records:
        row = [r["round"]]
        for what in ("full_zeroshot", "emulator_original", "emulator_tuned", "plugin"):
            row += [r.get(f"server_{what}_accuracy", float("nan")),
                    r.get(f"server_{what}_loss", float("nan"))]
        row.append(r.get("fit_train_loss", float("nan")))
        rows.append(row)
    return C.markdown_table(
        ["round", "full zero-shot acc", "loss", "emulator + original adapters acc", "loss",
         "emulator + tuned adapters acc", "loss", "plug-in (full + tuned) acc", "loss",
         "client train loss"], rows)


def bytes_table(records: list[dict]) -> str:
    r0 = records[0]
    full = r0["offsite_full_model_bytes"]
    rows = [["full model (fp32)", full / 1e6, 100.0],
            ["adapters (a + b blocks)", r0["offsite_adapter_bytes"] / 1e6,
             100 * r0["offsite_adapter_bytes"] / full],
            ["frozen emulator (n blocks + embeddings, norm, untied head)",
             r0["offsite_frozen_emulator_bytes"] / 1e6,
             100 * r0["offsite_frozen_emulator_bytes"] / full]]
    for r in records[1:]:
        rows.append([f"round {r['round']}: down per client (ledger)",
                     r["bytes_down_per_client"] / 1e6, 100 * r["bytes_down_per_client"] / full])
        rows.append([f"round {r['round']}: up per client (ledger)",
                     r["bytes_up_per_client"] / 1e6, 100 * r["bytes_up_per_client"] / full])
    return C.markdown_table(["what", "MB", "% of full model"], rows)


# --------------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    if args.child.startswith("memory:"):
        child_memory(args)
        return
    if args.child == "time":
        child_time(args)
        return
    if args.child == "prepare":
        print("RESULT " + json.dumps(_prepare(args, Path(args.work))), flush=True)
        return
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fatellm-bench-offsite-"))
    sections: list[str] = []
    info = spawn(args, "prepare", work)
    split_line = (f"Split: {info['layers']} blocks, adapters a={args.bottom} bottom + "
                  f"b={args.top} top, emulator keeps n={args.emulator_layers} middle blocks "
                  f"{info['emulator']}, drops {len(info['dropped'])} ({info['dropped']}); the "
                  f"client model has {len(info['kept'])} blocks, {info['emulator_params']:,} "
                  f"of the full model's {info['full_params']:,} parameters "
                  f"({info['full_params'] / info['emulator_params']:.2f}x smaller).")
    print(split_line, flush=True)
    sections.append(split_line)
    mem: dict[str, list[dict]] = {n: [] for n in CONFIGS}
    summary: list[tuple[str, str]] = []
    if "memory" in parts:
        for rep in range(args.repeats):  # A, B, C, D, A, B, ...: drift hits all alike
            for name in CONFIGS:
                mem[name].append(spawn(args, f"memory:{name}", work))
                print(f"[memory] rep {rep} {name}: peak {mem[name][-1]['peak_mb']:.0f} MB",
                      flush=True)
        peak = {n: [m["peak_mb"] for m in mem[n]] for n in CONFIGS}
        added = {n: [m["peak_mb"] - m["rss_baseline_mb"] for m in mem[n]] for n in CONFIGS}
        ratio = {n: [f / t for f, t in zip(peak["full-all"], peak[n])] for n in CONFIGS}
        ratio_added = {n: [f / t for f, t in zip(added["full-all"], added[n])]
                       for n in CONFIGS}
        rows = [[LABEL[n], mem[n][0]["params"], mem[n][0]["trainable"],
                 C.fmt_spread(peak[n], 4), C.fmt_spread(added[n], 4),
                 C.fmt_spread(ratio[n]), C.fmt_spread(ratio_added[n])] for n in CONFIGS]
        sections.append(
            f"Peak memory, one fresh process per row and repetition ({args.repeats} "
            f"interleaved repetitions; batch {args.batch_size} x max length "
            f"{args.max_length}, {args.steps} AdamW steps, {args.threads} threads); "
            "median (min, max) over the repetitions, ratios per repetition:\n\n"
            + C.markdown_table(["configuration", "params in process", "trainable",
                                "peak RSS ru_maxrss (MB)", "peak minus imports (MB)",
                                "full FT / this (peak)", "full FT / this (added)"], rows))
        summary.append((
            "Offsite client peak memory vs full fine-tuning (emulator + adapters)",
            f"**{C.median(ratio['emulator']):.2f}x** less peak RSS "
            f"({C.fmt_spread(ratio['emulator'])}; "
            f"{C.median(peak['emulator']) / 1024:.2f} vs "
            f"{C.median(peak['full-all']) / 1024:.2f} GB); LoRA adapters "
            f"{C.fmt_spread(ratio['emulator-lora'])} (paper: 5.6x on GPU); load "
            f"{C.load_avg()}"))
    if "time" in parts:
        t = spawn(args, "time", work)["step_s"]
        med = {n: C.median(v) for n, v in t.items()}
        per_step = {n: [f / x for f, x in zip(t["full-all"], t[n])] for n in CONFIGS}
        rows = [[LABEL[n], C.fmt_spread(t[n], 4, " s"), f"{med['full-all'] / med[n]:.2f}x",
                 C.fmt_spread(per_step[n]), f"{med['full-adapters'] / med[n]:.2f}x",
                 len(t[n])] for n in CONFIGS]
        sections.append(
            "Step time, one process, configurations interleaved step by step on the same "
            "batch, each step a repetition (first step of each excluded):\n\n"
            + C.markdown_table(["configuration", "s/step", "full FT / this (medians)",
                                "full FT / this, per step", "full-model adapters / this",
                                "steps"], rows))
        summary.insert(0, (
            "Offsite client step time vs full fine-tuning (emulator + adapters)",
            f"**{med['full-all'] / med['emulator']:.2f}x** faster (per step "
            f"{C.fmt_spread(per_step['emulator'])}; {med['emulator']:.2f} s vs "
            f"{med['full-all']:.2f} s); "
            f"{med['full-adapters'] / med['emulator']:.2f}x vs the same adapters in the full "
            f"model; LoRA on the adapters {C.fmt_spread(per_step['emulator-lora'])} (paper: "
            f"6.5x on GPU); load {C.load_avg()}"))
    if "quality" in parts:
        out_dir = work / "runs"
        records, wall = quality_run(args, "offsite", out_dir, distill=False)
        sections.append(
            f"Quality, `flwr run .` simulation: BBC News (`builtin:bbc-news`), "
            f"{args.max_examples} articles, {args.test_size} held out, IID over "
            f"{args.clients} clients; {args.rounds} rounds x {args.local_steps} local steps, "
            f"batch {args.batch_size}, lr {args.lr}, max length {args.quality_max_length}; "
            f"adapters fully fine-tuned, FedAvg; accuracy = most likely label (5 labels, "
            f"chance 0.2). Wall time {wall:.0f} s.\n\n" + quality_table(records)
            + "\n\nBytes per round (the run's communication ledger; serialized arrays + "
            "config strings):\n\n" + bytes_table(records))
        if args.distill:
            drecords, dwall = quality_run(args, "offsite-distill", out_dir, distill=True)
            r0 = drecords[0]
            sections.append(
                f"Same run with the distilled emulator ({args.distill_steps} steps on "
                f"`builtin:chatterbot` text, lr 1e-4; MSE "
                f"{r0.get('offsite_distill_mse_first', float('nan')):.4g} -> "
                f"{r0.get('offsite_distill_mse_last', float('nan')):.4g}). Wall time "
                f"{dwall:.0f} s.\n\n" + quality_table(drecords))
    notes = [
        "Memory rows include the Python/torch/transformers runtime (the 'minus imports' "
        "column removes the RSS measured right after the imports). The emulator processes "
        "rebuild the emulator from the saved client payload (`emulator_from_payload`), as a "
        "client does; the full-model processes load the full checkpoint.",
        "Paper ratios (6.5x speed, 5.6x memory) are for OPT-6.7B/1.3B on GPU at their split; "
        "on CPU at 135M parameters the embeddings (28.3M parameters, tied head) and the "
        "runtime are a large fixed share of the client's memory, so the ratios are smaller.",
        f"Took {time.perf_counter() - t_start:.0f}s.",
    ]
    C.emit(args.name, "Offsite-tuning: emulator vs full model, bytes, quality",
           "\n\n".join(sections), C.command_line(), notes, summary=summary)


if __name__ == "__main__":
    sys.exit(main())
