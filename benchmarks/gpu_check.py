"""One short round of each algorithm on a CUDA GPU: step time and peak GPU memory.

For QLoRA 4-bit homo, FedKSeed, offsite-tuning and DP-SGD (LoRA), the algorithm's own
server strategy builds round 1's fit message (server on the CPU, so its copy of the model
is not counted), and its own client trains on ``--device`` with that message: the fit is
timed (seconds per local step) and ``torch.cuda.max_memory_allocated`` is read around it.
The returned arrays are checked finite.

    python benchmarks/gpu_check.py                          # SmolLM2-135M on cuda
    python benchmarks/gpu_check.py --device cpu --model tiny --no-write   # dry run, no GPU

Needs a CUDA GPU for real numbers; on a machine without one it exits with the reason
(``--device cpu`` runs the same code path on the CPU, to check the script itself).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

ARMS = {
    "homo QLoRA 4-bit (LoRA r=8)": {"algorithm": "homo", "quantization": "4bit",
                                    "dtype": "bfloat16"},
    "homo LoRA bf16": {"algorithm": "homo", "dtype": "bfloat16"},
    "FedKSeed (ZO, K=1024)": {"algorithm": "fedkseed", "zo-num-seeds": 1024,
                              "dtype": "float32"},
    "offsite-tuning (emulator 2+6+2)": {"algorithm": "offsite", "offsite-bottom": 2,
                                        "offsite-top": 2, "offsite-emulator-layers": 6},
    "DP-SGD (Opacus, LoRA)": {"algorithm": "homo", "dp-sgd": True,
                              "dp-noise-multiplier": 1.0, "lora-dropout": 0.0},
}


def one_round(name: str, extra: dict, model: str, data: Path, device: str, steps: int,
              batch: int, workdir: Path) -> dict:
    import torch
    from flwr.app import ArrayRecord, Context, RecordDict
    from flwr.common import parameters_to_ndarrays

    from fatellm_flwr.algorithms import get_algorithm
    from fatellm_flwr.outputs import RunDir
    from fatellm_flwr.testing import FakeClientManager

    cfg = C.app_config({"model": model, "dataset": str(data), "test-size": 10,
                        "partitioner": "iid", "local-steps": steps, "batch-size": batch,
                        "max-length": 128, "server-eval": False, "plots": False,
                        "min-fit-clients": 2, "min-available-clients": 2,
                        "fraction-evaluate": 0.0, "device": device, **extra})
    algo = get_algorithm(cfg)
    server_cfg = cfg.replace(device="cpu", quantization="none", dtype="float32")
    strategy = algo.strategy_class()(server_cfg, RunDir.create(workdir, name.split()[0],
                                                               cfg.algorithm))
    cm = FakeClientManager(2)
    params = strategy.initialize_parameters(cm)
    proxy, ins = strategy.configure_fit(1, params, cm)[0]
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    for rec_name, rec in strategy.outbox.take(str(proxy.cid)).items():  # node_records_mod's job
        (ctx.state.array_records if isinstance(rec, ArrayRecord)
         else ctx.state.config_records)[rec_name] = rec
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t_load = time.perf_counter()
    client = algo.client_class()(cfg, 0, 2, context=ctx)
    load_s = time.perf_counter() - t_load
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    arrays, n, metrics = client.fit(parameters_to_ndarrays(ins.parameters), ins.config)
    if cuda:
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else float("nan")
    ok = n > 0 and all(np.all(np.isfinite(a)) for a in arrays)
    out = {"step_s": fit_s / steps, "peak_mb": peak, "load_s": load_s, "ok": ok,
           "loss": float(metrics.get("train_loss", float("nan")))}
    del client, strategy
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct",
                    help="model ref, or 'tiny' for a tiny random Llama")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--only", nargs="*", default=None, help="subset of arms (prefix match)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import torch

    from fatellm_flwr.device import DeviceError, device_summary, resolve_device

    try:
        dev = resolve_device(args.device)
    except DeviceError as e:
        sys.exit(f"gpu_check: {e}. Run it on a CUDA machine (or --device cpu for a dry run).")
    model = C.resolve_model_arg(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="fatellm-gpu-check-"))
    import json

    data = tmp / "topics.jsonl"
    words = {"sport": "the team won the match", "business": "shares rose in trading",
             "tech": "a new phone was released"}
    data.write_text("".join(json.dumps({"text": f"{w} {i}", "label": lbl}) + "\n"
                            for i in range(120) for lbl, w in [list(words.items())[i % 3]]))
    rows = []
    for name, extra in ARMS.items():
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        if args.model.startswith("tiny") and extra["algorithm"] == "offsite":
            extra = {**extra, "offsite-bottom": 1, "offsite-top": 1,
                     "offsite-emulator-layers": 1}  # the tiny model has 4 blocks
        if extra.get("quantization", "none") != "none" and dev.type != "cuda":
            rows.append([name, "skipped: bitsandbytes QLoRA is measured on CUDA", "", "", ""])
            continue
        r = one_round(name, extra, model, data, str(dev), args.steps, args.batch_size,
                      tmp / "runs")
        rows.append([name, f"{r['step_s']:.3f}", "n/a" if r["peak_mb"] != r["peak_mb"]
                     else f"{r['peak_mb']:,.0f}", f"{r['load_s']:.1f}",
                     "yes" if r["ok"] else "NO"])
        print(rows[-1], flush=True)
    table = C.markdown_table(["algorithm (one round, one client)", "s / local step",
                              "peak GPU memory (MB, client)", "client set-up (s)",
                              "finite update"], rows)
    gpu = device_summary(dev)
    notes = [f"Device: {gpu}; torch {torch.__version__}; model `{args.model}`; "
             f"{args.steps} local steps of batch {args.batch_size}, max-length 128.",
             "Peak GPU memory: `torch.cuda.max_memory_allocated()` above what was allocated "
             "before the client was built (weights + activations + optimizer state); the "
             "server strategy ran on the CPU."]
    C.emit("gpu_check", "One round of each algorithm on a GPU", table, C.command_line(),
           notes, write=not args.no_write and dev.type == "cuda")


if __name__ == "__main__":
    main()
