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


def payload_bytes(model) -> tuple[int, int, int, int]:
    """``(serialised bytes, raw float32 bytes, number of tensors, serialised bytes with
    wire-dtype=float16)`` of the trainable state, through the app's own wire codec."""
    from fatellm_flwr.models import get_trainable_state
    from fatellm_flwr.wire.common import encode_arrays, parameters_nbytes

    arrays = get_trainable_state(model)
    ser = parameters_nbytes(encode_arrays(arrays, "float32"))
    ser16 = parameters_nbytes(encode_arrays(arrays, "float16"))
    raw = int(sum(a.nbytes for a in arrays))
    return ser, raw, len(arrays), ser16


# Llama-2-7B's published config (meta-llama/Llama-2-7b-hf config.json), written by hand: the
# shape FATE-LLM's 0.058% compares with (ChatGLM-6B needs its own remote code, not available
# offline). Built on the `meta` device: shapes only, no weights, no memory.
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 hidden_act="silu")


def npy_bytes(shape: tuple[int, ...], dtype) -> int:
    """Bytes of one array as Flower serialises it (``np.save``: header + data), computed from
    its shape alone (``numpy.lib.format``'s own header writer)."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(
        np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)})
    return len(buf.getvalue()) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def paper_shape_rows(lora_r: int) -> tuple[list[list], int]:
    """``(rows, total params)``: full fine-tuning vs LoRA on Llama-2-7B's shape, bytes per
    client-round one way with float32 and float16 on the wire."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fatellm_flwr.models import wrap_peft

    def build():
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA2_7B))

    def payload(model, dtype) -> int:
        return sum(npy_bytes(tuple(p.shape), dtype) for p in model.parameters()
                   if p.requires_grad)

    full = build()
    total = sum(p.numel() for p in full.parameters())
    full32, full16 = payload(full, np.float32), payload(full, np.float16)
    rows = [["full fine-tuning (all parameters)", total, full32, full16, 100.0]]
    del full
    for targets in ("q_proj,v_proj", "q_proj,k_proj,v_proj", ""):
        cfg = C.app_config({"model": "meta", "peft-method": "lora", "lora-r": lora_r,
                            "target-modules": targets})
        model = wrap_peft(build(), cfg)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        b32, b16 = payload(model, np.float32), payload(model, np.float16)
        label = (f"LoRA r={lora_r}, " + (targets.replace("_proj", "").replace(",", ", ")
                                         if targets else "all linear layers (auto)"))
        rows.append([label, n, b32, b16, 100.0 * b32 / full32])
        del model
    return rows, total


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
    full_ser, full_raw, full_n, full16 = payload_bytes(base)
    _, total_params = count_parameters(base)
    found = find_target_modules(base)
    arch = type(base).__name__
    del base
    gc.collect()

    rows = [["full fine-tuning (all parameters)", full_n, total_params, full_ser, 1.0, 100.0,
             full16]]
    for label, extra in arms:
        cfg = C.app_config({"model": model_ref, "lora-r": args.lora_r,
                            "num-virtual-tokens": args.num_virtual_tokens, **extra})
        base = load_base_model(model_ref)
        model = wrap_peft(base, cfg)
        trainable, _ = count_parameters(model)
        ser, raw, n, ser16 = payload_bytes(model)
        rows.append([label.format(r=args.lora_r, v=args.num_virtual_tokens,
                                  qv=args.qv_modules.replace(",", ", ")),
                     n, trainable, ser, full_ser / ser, 100.0 * ser / full_ser, ser16])
        del model, base
        gc.collect()
    elapsed = time.perf_counter() - t0

    table = C.markdown_table(
        ["method", "tensors sent", "trainable params", "bytes per client-round (one way)",
         "full FT / method", "% of full FT", "bytes with wire-dtype=float16",
         "float32 / float16 bytes"],
        [[r[0], r[1], r[2], r[3], f"{r[4]:,.0f}x" if r[4] >= 10 else f"{r[4]:.2f}x",
          f"{r[5]:.4g}%", r[6], f"{r[3] / r[6]:.3f}x"] for r in rows])
    paper_rows, paper_total = paper_shape_rows(args.lora_r)
    paper = C.markdown_table(
        ["method (Llama-2-7B shape)", "trainable params", "bytes, float32 wire",
         "bytes, float16 wire", "% of full FT (same wire dtype)"],
        [[r[0], r[1], r[2], r[3], f"{r[4]:.4g}%"] for r in paper_rows])
    body = (f"Model `{args.model}` ({arch}, {total_params:,} parameters). Linear layers "
            f"found automatically for LoRA/IA3: {', '.join(found)}.\n\n{table}\n\n"
            f"The paper's model scale: Llama-2-7B's shape ({paper_total:,} parameters; its "
            "published config written by hand and built on the `meta` device, no weights; "
            "LoRA wrapped by the app's own `wrap_peft`; bytes computed from each tensor's "
            "shape with numpy's .npy header writer, i.e. what Flower serialises). FATE-LLM "
            f"reports 0.058% for LoRA on ChatGLM-6B (`query_key_value`).\n\n{paper}")
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
        "wire-dtype=float16 (`fatellm_flwr.wire.common.encode_arrays`): float32 arrays "
        "travel as float16 both ways; the server aggregates in float32. The ratio is just "
        "under 2 because each tensor's .npy header does not shrink.",
        "ChatGLM-6B itself needs its remote modelling code (not available offline), hence "
        "Llama-2-7B's shape: its q,v row is the closest setup to FATE-LLM's (LoRA on the "
        "attention input projections, r=8).",
        f"Took {elapsed:.0f}s (model loads dominate); timings are not the point here.",
    ]
    pct = {r[0].split(" (")[0].split(",")[0]: r[5] for r in rows[1:]}
    lora_all, lora_qv = rows[1], rows[2]
    summary = [(
        f"bytes per client-round, LoRA r={args.lora_r} vs full fine-tuning",
        f"LoRA on all {len(found)} linear layer types {lora_all[3] / 1e6:.1f} MB = "
        f"**{lora_all[5]:.3g}%** of full ({full_ser / 1e6:.0f} MB); LoRA on "
        f"{args.qv_modules.replace('_proj', '')} only {lora_qv[5]:.2g}%; "
        f"IA3 {pct['IA3']:.2g}%; prefix {pct['prefix tuning']:.2g}%; prompt tuning "
        f"{pct['prompt tuning']:.2g}% (FATE-LLM: 0.058% on ChatGLM-6B, a 46x larger model); "
        f"byte counts, exact (no timing)"), (
        "bytes with wire-dtype=float16 vs float32",
        f"float32 / float16 = {min(r[3] / r[6] for r in rows):.3f}-"
        f"{max(r[3] / r[6] for r in rows):.3f}x per method (e.g. LoRA all linear "
        f"{lora_all[3] / 1e6:.1f} -> {lora_all[6] / 1e6:.1f} MB); server aggregates in float32; "
        "byte counts, exact"), (
        f"LoRA r={args.lora_r} as % of full fine-tuning at the paper's scale (Llama-2-7B shape)",
        f"q,v {paper_rows[1][4]:.3g}%, q,k,v {paper_rows[2][4]:.3g}%, all linear "
        f"{paper_rows[3][4]:.3g}% of {paper_rows[0][2] / 1e9:.1f} GB (FATE-LLM: 0.058% on "
        "ChatGLM-6B, query_key_value); built on the meta device, byte counts exact")]
    C.emit("homo_comm", "FedHomoLLM communication per client-round: PEFT vs full fine-tuning",
           body, C.command_line(), notes, summary=summary,
           write=not args.model.startswith("tiny"))  # a tiny check prints only


if __name__ == "__main__":
    main()
