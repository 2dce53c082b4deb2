"""FedKSeed local step time with ``zo-cache-z`` off (MeZO-style regeneration) and on.

A ZO step (:func:`fatellm_flwr.zo.zo_step`) runs two forwards and, by default, generates the
seed's Gaussian direction z over every tuned tensor three times (+eps, -2 eps, restore and
update), holding no copy of it. ``cache_z=True`` generates z once and holds it for the step.
On a 135M model on CPU, z generation (~0.5 s per full z) costs more than the forwards, so
this is FedKSeed's main speed knob; its price is one copy of the tuned weights in memory.

Both arms take the same real steps on the same model, batch and seeds, interleaved
(off, on, off, on, ...) so the machine's drift hits both alike; reported: seconds per step
(min / median / max over repetitions), the per-repetition speed-up, and the memory the cache
holds (the tuned tensors' bytes, computed from their shapes and dtype; on CUDA also the
measured peak). The weights after both arms are checked to be bit-identical.

    python benchmarks/zo_cache_z.py                      # SmolLM2-135M, batch 4 x 96
    python benchmarks/zo_cache_z.py --model tiny --quick # check of the script only
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common as C

NAME = "zo_cache_z"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct",
                   help="model ref, or 'tiny' for a tiny random Llama")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--steps", type=int, default=3, help="ZO steps per repetition and arm")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--quick", action="store_true", help="1 repeat x 1 step, nothing written")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 1, 1
    import torch

    from fatellm_flwr.device import place_model, resolve_device
    from fatellm_flwr.models import load_base_model
    from fatellm_flwr.zo import candidate_seeds, zo_parameters, zo_step

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model_ref = C.resolve_model_arg(args.model)
    models = {arm: place_model(load_base_model(model_ref), device).eval()
              for arm in ("off", "on")}
    params = {arm: [p for _, p in zo_parameters(m, exclude_embeddings=True)]
              for arm, m in models.items()}
    vocab = models["off"].config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    seeds = [int(s) for s in candidate_seeds(4096, 42)]
    cursor = {"off": 0, "on": 0}

    def arm(name: str):
        def call(rep: int) -> float:
            model, cache = models[name], name == "on"
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                zo_step(params[name], lambda: model(input_ids=ids, labels=ids).loss,
                        seeds[cursor[name]], eps=1e-3, lr=2e-6, cache_z=cache)
                cursor[name] += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return (time.perf_counter() - t0) / args.steps
        return call

    with torch.no_grad():
        models["off"](input_ids=ids)  # warm-up
        models["on"](input_ids=ids)
    bench = C.Interleaved({"off": arm("off"), "on": arm("on")}).run(args.repeats)
    identical = all(torch.equal(a, b) for a, b in zip(params["off"], params["on"]))
    if not identical:
        raise SystemExit("cache_z changed the weights: the arms must be bit-identical")
    tuned = params["off"]
    cache_mb = sum(p.numel() * p.element_size() for p in tuned) / 2**20
    speedups = bench.ratios("off", "on")
    rows = [["zo-cache-z=false (default)", C.fmt_spread(bench.values("off"), unit=" s"),
             "0", "2 forwards + 3 z generations"],
            ["zo-cache-z=true", C.fmt_spread(bench.values("on"), unit=" s"),
             f"{cache_mb:,.1f} (computed)", "2 forwards + 1 z generation"]]
    table = C.markdown_table(["arm", "seconds per ZO step", "extra memory held (MiB)", "work"],
                             rows)
    lo, mid, hi = C.spread(speedups)
    body = "\n".join([
        f"Model `{args.model}` on {device} ({len(tuned)} tuned tensors, "
        f"{sum(p.numel() for p in tuned):,} weights, embeddings excluded as by default, "
        f"{tuned[0].dtype}), batch {args.batch} x {args.seq_len} tokens, torch threads "
        f"{torch.get_num_threads()}; {args.steps} steps per repetition and arm, "
        f"{args.repeats} repetitions, interleaved.", "", table, "",
        f"Speed-up (off / on, paired per repetition): median {mid:.2f}x (min {lo:.2f}x, "
        f"max {hi:.2f}x). Weights after both arms: bit-identical.", "", bench.load_note()])
    summary = [(f"FedKSeed `zo-cache-z=true` vs the default, seconds per local ZO step "
                f"({args.model.split(':')[-1]}, batch {args.batch} x {args.seq_len}, {device})",
                f"{statistics.median(bench.values('off')):.3g} s -> "
                f"{statistics.median(bench.values('on')):.3g} s (median speed-up {mid:.2f}x, "
                f"min {lo:.2f}x, max {hi:.2f}x) for {cache_mb:,.1f} MiB more memory; same "
                "weights bit for bit")]
    C.emit(NAME, "FedKSeed: holding z for the step (zo-cache-z) vs regenerating it",
           body, C.command_line(), write=not args.quick and args.model != "tiny",
           summary=summary)


if __name__ == "__main__":
    main()
