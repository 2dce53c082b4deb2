"""FedKSeed's z generation: threaded across tensors, and held for the step (zo-cache-z).

A ZO step (:func:`fatellm_flwr.zo.zo_step`) runs two forwards and, by default, generates the
seed's Gaussian direction z over every tuned tensor three times (+eps, -2 eps, restore and
update), holding no copy of it (MeZO's memory). torch's CPU generator draws one tensor's
normals serially, so on a 135M model z generation costs more than the forwards.
Two remedies, both giving the same weights bit for bit:

- tensors' z are drawn ahead, concurrently, on ``torch.get_num_threads()`` worker threads
  while the caller does the arithmetic (:func:`fatellm_flwr.zo.z_stream`, always on;
  ``zo.PARALLEL_Z = False`` restores the one-thread behaviour for this comparison);
- ``zo-cache-z=true`` generates z once per step and holds it (one copy of the tuned weights).

Measured side by side, interleaved (so the machine's drift hits every arm alike): seconds
per ZO step for three arms (one-thread regeneration = the code before; threaded
regeneration = the default; threaded + cache), and seconds per seed of a replay
(:func:`~fatellm_flwr.zo.apply_seed_updates`, what a client or the server pays to move its
model between global states) one-thread vs threaded. The arms' weights are compared bit for
bit at the end.

    python benchmarks/zo_speed.py                       # SmolLM2-135M, batch 4 x 96
    python benchmarks/zo_speed.py --model tiny --quick  # check of the script only
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common as C

NAME = "zo_speed"
STEP_ARMS = {"regenerate, 1 thread (before)": (False, False),
             "regenerate, threaded (default)": (False, True),
             "zo-cache-z=true, threaded": (True, True)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct",
                   help="model ref, or 'tiny' for a tiny random Llama")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--steps", type=int, default=2, help="ZO steps per repetition and arm")
    p.add_argument("--replay-seeds", type=int, default=4, help="seeds per replay repetition")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--quick", action="store_true", help="1 repeat x 1 step, nothing written")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.replay_seeds = 1, 1, 1
    import torch

    from fatellm_flwr import zo
    from fatellm_flwr.device import place_model, resolve_device
    from fatellm_flwr.models import load_base_model

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model_ref = C.resolve_model_arg(args.model)
    models = {arm: place_model(load_base_model(model_ref), device).eval() for arm in STEP_ARMS}
    params = {arm: [p for _, p in zo.zo_parameters(m, exclude_embeddings=True)]
              for arm, m in models.items()}
    ids = torch.randint(0, next(iter(models.values())).config.vocab_size,
                        (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    seeds = [int(s) for s in zo.candidate_seeds(4096, 42)]
    cursor = dict.fromkeys(STEP_ARMS, 0)

    def timed(body, parallel: bool, per: int):
        zo.PARALLEL_Z = parallel
        try:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            body()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return (time.perf_counter() - t0) / per
        finally:
            zo.PARALLEL_Z = True

    def step_arm(name: str):
        cache, parallel = STEP_ARMS[name]
        model = models[name]

        def body():
            for _ in range(args.steps):
                zo.zo_step(params[name], lambda: model(input_ids=ids, labels=ids).loss,
                           seeds[cursor[name]], eps=1e-3, lr=2e-6, cache_z=cache)
                cursor[name] += 1
        return lambda rep: timed(body, parallel, args.steps)

    names = list(STEP_ARMS)
    ref = params[names[0]]  # replay runs on the first arm's weights, after the step arms

    def replay_arm(parallel: bool, sign: float):
        def body():
            zo.apply_seed_updates(ref, {s: sign * 1e-6
                                                  for s in seeds[-args.replay_seeds:]})
        return lambda rep: timed(body, parallel, args.replay_seeds)

    with torch.no_grad():
        for m in models.values():
            m(input_ids=ids)  # warm-up
    steps = C.Interleaved({name: step_arm(name) for name in STEP_ARMS}).run(args.repeats)
    identical = all(all(torch.equal(a, b) for a, b in zip(ref, params[n])) for n in names[1:])
    if not identical:
        raise SystemExit("the arms' weights differ: threading and caching must be bit-exact")
    # replay: +c then -c on the same seeds (the weights come back up to rounding)
    replay = C.Interleaved({"1 thread": replay_arm(False, 1.0),
                            "threaded": replay_arm(True, -1.0)}).run(args.repeats)
    cache_mb = sum(p.numel() * p.element_size() for p in ref) / 2**20
    work = ["2 forwards + 3 serial z generations", "2 forwards + 3 threaded z generations",
            "2 forwards + 1 threaded z generation"]
    rows = [[n, C.fmt_spread(steps.values(n), unit=" s"),
             f"{cache_mb:,.1f} (computed)" if STEP_ARMS[n][0] else "0", w]
            for n, w in zip(names, work)]
    step_table = C.markdown_table(["arm", "seconds per ZO step", "extra memory held (MiB)",
                                   "work"], rows)
    thread_x = steps.ratios(names[0], names[1])
    cache_x = steps.ratios(names[1], names[2])
    total_x = steps.ratios(names[0], names[2])
    replay_x = replay.ratios("1 thread", "threaded")
    replay_table = C.markdown_table(
        ["replay (apply_seed_updates)", "seconds per seed"],
        [[n, C.fmt_spread(replay.values(n), unit=" s")] for n in ("1 thread", "threaded")])
    tuned = sum(p.numel() for p in ref)
    body = "\n".join([
        f"Model `{args.model}` on {device} ({len(ref)} tuned tensors, {tuned:,} weights, "
        f"embeddings excluded as by default, {ref[0].dtype}), batch {args.batch} x "
        f"{args.seq_len} tokens, torch threads {torch.get_num_threads()}; {args.steps} steps "
        f"per repetition and arm, {args.repeats} repetitions, interleaved.", "", step_table,
        "", "Speed-ups, paired per repetition (median, min-max): threading "
        f"{C.fmt_spread(thread_x, unit='x')}; caching on top "
        f"{C.fmt_spread(cache_x, unit='x')}; both vs before "
        f"{C.fmt_spread(total_x, unit='x')}. Weights after all arms: bit-identical.", "",
        f"Replay of {args.replay_seeds} seeds per repetition:", "", replay_table, "",
        f"Replay speed-up from threading: {C.fmt_spread(replay_x, unit='x')}.", "",
        f"Steps: {steps.load_note()}", "", f"Replay: {replay.load_note()}"])
    med = {n: statistics.median(steps.values(n)) for n in names}
    short = args.model.split(":")[-1]
    summary = [
        (f"FedKSeed seconds per local ZO step ({short}, batch {args.batch} x {args.seq_len}, "
         f"{device}, {torch.get_num_threads()} threads): one-thread z / threaded z (default) "
         "/ threaded + `zo-cache-z=true`",
         f"{med[names[0]]:.3g} s / {med[names[1]]:.3g} s / {med[names[2]]:.3g} s (median "
         f"speed-up {statistics.median(total_x):.2f}x for both, {cache_mb:,.1f} MiB more "
         "memory with the cache); same weights bit for bit"),
        (f"FedKSeed replay seconds per seed ({short}, {torch.get_num_threads()} threads): one "
         "thread / threaded",
         f"{statistics.median(replay.values('1 thread')):.3g} s / "
         f"{statistics.median(replay.values('threaded')):.3g} s (median speed-up "
         f"{statistics.median(replay_x):.2f}x)")]
    C.emit(NAME, "FedKSeed: threaded z generation and zo-cache-z vs one-thread regeneration",
           body, C.command_line(), write=not args.quick and args.model != "tiny",
           summary=summary)


if __name__ == "__main__":
    main()
