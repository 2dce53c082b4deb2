"""Communication per client-round of FedHomoLLM: PEFT adapters vs full fine-tuning.

For each PEFT method the base model is loaded and wrapped with the package's own builder
(``models.load_base_model`` + ``models.wrap_peft``; LoRA/IA3 targets found from the
model), and the real Flower payload is serialised exactly as the strategy does it:
``flwr.common.ndarrays_to_parameters(models.get_trainable_state(model))``, summing
``len(t)`` over ``.tensors``. Full fine-tuning = every parameter of the same base model
trainable (tied weights counted once, as ``named_parameters`` lists them).

Each client receives the global trainable state and sends back the same shapes, so the
bytes down equal the bytes up; "per client-round" below is one direction.

Example::

    python benchmarks/homo_comm.py
    python benchmarks/homo_comm.py --model tiny      # quick check with a tiny random model
"""

from __future__ import annotations

import argparse
import gc
import time

import _common as C

FATE_LLM_REF = ("FATE-LLM reports LoRA at 0.058% of full fine-tuning communication on "
                "ChatGLM-6B (paper; 0.059% in its figure) and P-Tuning v2 at 0.473%.")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct",
                   help="model ref, or 'tiny' for a tiny random Llama (quick check only)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    p.add_argument("--num-virtual-tokens", type=int, default=8,
                   help="virtual tokens for prompt and prefix tuning")
    p.add_argument("--qv-modules", default="q_proj,v_proj",
                   help="target modules of the 'LoRA on q,v only' row")
    return p.parse_args()


def payload_bytes(model) -> tuple[int, int, int]:
    """``(serialised bytes, raw float32 bytes, number of tensors)`` of the trainable state."""
    from flwr.common import ndarrays_to_parameters

    from fatellm_flwr.models import get_trainable_state

    arrays = get_trainable_state(model)
    params = ndarrays_to_parameters(arrays)
    ser = int(sum(len(t) for t in params.tensors))
    raw = int(sum(a.nbytes for a in arrays))
    return ser, raw, len(arrays)


def main() -> None:
    args = parse_args()
    model_ref = C.resolve_model_arg(args.model)
    from fatellm_flwr.models import (
        count_parameters,
        find_target_modules,
        load_base_model,
        wrap_peft,
    )

    arms = [
        ("LoRA r={r}, all linear layers (auto)", {"peft-method": "lora", "target-modules": ""}),
        ("LoRA r={r}, {qv} only", {"peft-method": "lora", "target-modules": args.qv_modules}),
        ("IA3 (all linear layers, auto)", {"peft-method": "ia3", "target-modules": ""}),
        ("prompt tuning ({v} virtual tokens)", {"peft-method": "prompt-tuning"}),
        ("prefix tuning ({v} virtual tokens)", {"peft-method": "prefix-tuning"}),
    ]
    t0 = time.perf_counter()
    base = load_base_model(model_ref)
    for p in base.parameters():
        p.requires_grad_(True)
    full_ser, full_raw, full_n = payload_bytes(base)
    _, total_params = count_parameters(base)
    found = find_target_modules(base)
    arch = type(base).__name__
    del base
    gc.collect()

    rows = [["full fine-tuning (all parameters)", full_n, total_params, full_ser, 1.0, 100.0]]
    for label, extra in arms:
        cfg = C.app_config({"model": model_ref, "lora-r": args.lora_r,
                            "num-virtual-tokens": args.num_virtual_tokens, **extra})
        base = load_base_model(model_ref)
        model = wrap_peft(base, cfg)
        trainable, _ = count_parameters(model)
        ser, raw, n = payload_bytes(model)
        rows.append([label.format(r=args.lora_r, v=args.num_virtual_tokens,
                                  qv=args.qv_modules.replace(",", ", ")),
                     n, trainable, ser, full_ser / ser, 100.0 * ser / full_ser])
        del model, base
        gc.collect()
    elapsed = time.perf_counter() - t0

    table = C.markdown_table(
        ["method", "tensors sent", "trainable params", "bytes per client-round (one way)",
         "full FT / method", "% of full FT"],
        [[r[0], r[1], r[2], r[3], f"{r[4]:,.0f}x" if r[4] >= 10 else f"{r[4]:.2f}x",
          f"{r[5]:.4g}%"] for r in rows])
    body = (f"Model `{args.model}` ({arch}, {total_params:,} parameters). Linear layers "
            f"found automatically for LoRA/IA3: {', '.join(found)}.\n\n{table}")
    notes = [
        "Bytes = `sum(len(t) for t in ndarrays_to_parameters(get_trainable_state(model))"
        ".tensors)`: float32 values plus a ~128-byte .npy header per tensor "
        f"(full FT: {full_ser - full_raw:,} header bytes over {full_raw:,} raw bytes).",
        "Down (server -> client) equals up (client -> server): the same trainable state "
        "travels both ways each round; a round with N clients moves 2 x N x these bytes.",
        FATE_LLM_REF + " Their LoRA targeted `query_key_value` only: by the same count "
        "(arithmetic, not measured here) ChatGLM-6B's 28 layers x r=8 x (4096 + 12288) = "
        "3.67M adapter parameters over ~6.17B = 0.059%. ChatGLM-6B is ~46x larger than "
        "SmolLM2-135M while an adapter grows only with width x depth, so the same method "
        "is a larger share of a small model (here the q,v-only row is FATE-LLM's setup).",
        f"Took {elapsed:.0f}s (model loads dominate); timings are not the point here.",
    ]
    C.emit("homo_comm", "FedHomoLLM communication per client-round: PEFT vs full fine-tuning",
           body, C.command_line(), notes)


if __name__ == "__main__":
    main()
