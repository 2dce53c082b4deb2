"""Per-sample gradient norms and DP-SGD's signal-to-noise ratio for a choice of adapters.

DP-SGD clips every record's gradient to ``dp-max-grad-norm`` (C) and adds Gaussian noise of
standard deviation ``sigma x C`` to the sum, so on the mean of an expected batch B the
noise has norm about ``sigma x C x sqrt(d) / B`` over d tuned coordinates, while the signal
(the mean clipped gradient) has norm at most C. Two consequences (Li et al. 2021,
arXiv 2110.05679): a C above the records' gradient norms clips nothing and only inflates
the noise, and the noise grows with sqrt(d). This script measures both on BBC News with
the package's own model, data and loss:

- the per-sample gradient norms of ``--examples`` records of client 0 at the adapters'
  initial values (min / median / max), and the share a clip C would clip;
- the norm of the mean clipped gradient (the signal) at each C, the noise norm at the
  noise multiplier ``dp-target-epsilon`` needs (Opacus' RDP accountant, the client's real
  sampling rate and steps), and their ratio.

    python benchmarks/dp_grad_norms.py                   # SmolLM2-135M, the dp_settings split
    python benchmarks/dp_grad_norms.py --model tiny --quick
"""

from __future__ import annotations

import argparse
import math

import _common as C

NAME = "dp_grad_norms"
# name -> (lora-r, target-modules, peft-last-layers)
ADAPTERS = {"r1-v-last8": (1, "v_proj", 8), "r4-qv-last8": (4, "q_proj,v_proj", 8)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--adapters", default=",".join(ADAPTERS))
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--clips", default="0.1,1.0")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="expected DP batch")
    p.add_argument("--epochs", type=float, default=0.7, help="local epochs over the run")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny settings, results not written")
    args = p.parse_args(argv)
    if args.quick:
        args.examples, args.max_length = 4, 48
    return args


def config(args, model: str, adapter: str):
    r, targets, last = ADAPTERS[adapter]
    return C.app_config({"algorithm": "homo", "model": model, "dataset": "builtin:bbc-news",
                         "peft-method": "lora", "lora-r": r, "lora-alpha": 2.0 * r,
                         "lora-dropout": 0.0, "target-modules": targets,
                         "peft-last-layers": 1 if args.quick else last,
                         "max-examples": 120 if args.quick else 0, "test-size": 12 if
                         args.quick else 100, "val-fraction": 0.0, "partitioner": "iid",
                         "max-length": args.max_length, "use-chat-template": False,
                         "seed": 42, "min-fit-clients": args.clients,
                         "min-available-clients": args.clients})


def per_sample_grads(cfg, examples: int):
    """``(gradients [n, d], client examples)``: one flattened gradient per record."""
    import torch

    from fatellm_flwr.data import collate, federated_data, tokenize_dataset
    from fatellm_flwr.models import clear_model_cache, load_peft_model
    from fatellm_flwr.train import causal_lm_loss

    clear_model_cache()
    model, tok = load_peft_model(cfg)
    fed = federated_data(cfg, cfg.min_fit_clients)
    part = fed.client_split(0, 0.0, cfg.seed)[0]
    rows = tokenize_dataset(part.select(range(min(examples, len(part)))), tok, cfg,
                            fed.task_data).select_columns(
        ["input_ids", "attention_mask", "labels"]).to_list()
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    grads = []
    for row in rows:
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model, collate([row], tok.pad_token_id)).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]).double())
    model.eval()
    return torch.stack(grads), len(part)


def noise_multiplier(args, n_client: int) -> tuple[float, float, int]:
    from opacus.accountants.utils import get_noise_multiplier

    q = min(1.0, args.batch_size / n_client)
    steps = max(1, round(args.epochs * n_client / args.batch_size))
    sigma = get_noise_multiplier(target_epsilon=args.epsilon, target_delta=1e-5,
                                 sample_rate=q, steps=steps, accountant="rdp")
    return sigma, q, steps


def measure(args, model: str, adapter: str) -> dict:
    g, n_client = per_sample_grads(config(args, model, adapter), args.examples)
    norms = g.norm(dim=1)
    sigma, q, steps = noise_multiplier(args, n_client)
    d = g.shape[1]
    per_clip = []
    for clip in [float(c) for c in args.clips.split(",")]:
        clipped = g * (clip / norms.clamp_min(1e-12)).clamp(max=1.0)[:, None]
        signal = clipped.mean(dim=0).norm().item()
        noise = sigma * clip * math.sqrt(d) / args.batch_size
        per_clip.append({"clip": clip, "clipped": float((norms > clip).float().mean()),
                         "signal": signal, "noise": noise, "ratio": noise / signal})
    s = sorted(norms.tolist())
    return {"adapter": adapter, "d": d, "n": len(s), "min": s[0], "median": s[len(s) // 2],
            "max": s[-1], "sigma": sigma, "q": q, "steps": steps, "per_clip": per_clip}


def report(args, results: list[dict], load0, write: bool) -> str:
    rows = []
    for r in results:
        for c in r["per_clip"]:
            rows.append([r["adapter"], f"{r['d']:,}",
                         f"{C.fmt(r['min'], 3)} / {C.fmt(r['median'], 3)} / "
                         f"{C.fmt(r['max'], 3)}", C.fmt(c["clip"]),
                         f"{100 * c['clipped']:.0f}%", C.fmt(c["signal"], 3),
                         C.fmt(c["noise"], 3), C.fmt(c["ratio"], 3)])
    first = results[0]
    table = C.markdown_table(
        ["adapters", "tuned coordinates d", "per-sample grad norm min / median / max",
         "clip C", "records clipped", "signal: norm of the mean clipped grad",
         "noise: sigma C sqrt(d) / B", "noise / signal (one client, one step)"], rows)
    body = "\n".join([
        f"Model `{args.model}`, BBC News (builtin), use-chat-template=false, max length "
        f"{args.max_length}; {first['n']} records of client 0 (of {args.clients}, IID), "
        "gradients at the adapters' initial values (LoRA B = 0: the signal is largest "
        f"there and shrinks as the loss falls). Noise at epsilon {args.epsilon:g} (delta "
        f"1e-5): sigma {first['sigma']:.3f} for expected batch B = {args.batch_size} "
        f"(sampling rate {first['q']:.4f}, {first['steps']} steps = {args.epochs:g} "
        "epochs). Adapters: " + "; ".join(
            f"`{k}` = LoRA r={v[0]} on {v[1]} of the last {v[2]} blocks"
            for k, v in ADAPTERS.items() if k in {r['adapter'] for r in results}) + ".",
        "", table, "", f"Load average before / after: {load0} / {C.load_avg()}."])
    best = min((c["ratio"], r["adapter"], c["clip"]) for r in results for c in r["per_clip"])
    worst = max((c["ratio"], r["adapter"], c["clip"]) for r in results for c in r["per_clip"])
    summary = [("DP-SGD noise / signal per step at epsilon "
                f"{args.epsilon:g} (batch {args.batch_size}, BBC News, SmolLM2)",
                f"{C.fmt(best[0], 3)} with {best[1]} at clip {best[2]:g}, "
                f"{C.fmt(worst[0], 3)} with {worst[1]} at clip {worst[2]:g}; per-sample "
                "gradient norms (median) " + ", ".join(
                    f"{r['adapter']} {C.fmt(r['median'], 3)}" for r in results))]
    return C.emit(NAME, "DP-SGD: per-sample gradient norms and noise vs signal", body,
                  C.command_line(), write=write, summary=summary, notes=[
                      "Noise / signal is for one client's step; FedAvg over m clients "
                      "divides the noise by sqrt(m), and T steps add signal T times and "
                      "noise sqrt(T) times.",
                      "A clip above every gradient norm clips nothing and leaves the "
                      "signal as is, while the noise grows with C."])


def main(argv=None) -> None:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = C.load_avg()
    model = C.resolve_model_arg(args.model)
    results = [measure(args, model, a.strip()) for a in args.adapters.split(",") if a.strip()]
    report(args, results, load0, write=not args.quick)


if __name__ == "__main__":
    main()
