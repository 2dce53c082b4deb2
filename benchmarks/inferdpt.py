"""InferDPT (Tong et al. 2023, arXiv 2310.12214) on ChatterBot Q&A with SmolLM2.

For each question of a fixed sample of the builtin ChatterBot corpus: the non-private answer
(the remote LLM sees the question), then for every epsilon the private pipeline of
:class:`~fatellm_flwr.privacy.inferdpt.InferDPT` — RANTEXT perturbation over the local model's
embedding table (top-k neighbourhood), the remote LLM's answer to the perturbed question, the
local model's extraction from the original question + that answer. Reported per epsilon:
ROUGE-L of the final answer against the non-private answer (and against the corpus answer),
the fraction of question tokens that passed unchanged, seconds per query. ``none`` = the
pipeline without perturbation (epsilon 0), which isolates the extraction step's effect.

Local and remote model are both SmolLM2-135M-Instruct here (the only instruct model in the
offline assets); the remote one stands in for a black-box API.

Example::

    flock /tmp/real.lock python benchmarks/inferdpt.py
    python benchmarks/inferdpt.py --model tiny --queries 3 --no-write   # pipeline check
"""

from __future__ import annotations

import argparse
import time

import _common as C
import numpy as np
import torch

NAME = "inferdpt"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct",
                   help="local and remote model (or 'tiny')")
    p.add_argument("--epsilons", default="1,3,6,none")
    p.add_argument("--queries", type=int, default=6)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from fatellm_flwr.assets import load_builtin_dataset
    from fatellm_flwr.metrics import rouge_l
    from fatellm_flwr.models import load_base_model, load_tokenizer
    from fatellm_flwr.privacy.inferdpt import InferDPT, hf_generator, perturber_for

    torch.set_num_threads(2)
    ref = C.resolve_model_arg(args.model)
    tok, model = load_tokenizer(ref), load_base_model(ref)
    llm = hf_generator(model, tok, args.max_new_tokens)  # remote and local: the same weights
    ds = load_builtin_dataset("chatterbot").shuffle(seed=args.seed).select(range(args.queries))
    questions, corpus = list(ds["instruction"]), list(ds["output"])
    t0 = time.perf_counter()
    reference = llm(questions)
    base_s = (time.perf_counter() - t0) / len(questions)
    perturber = perturber_for(model, tok, args.top_k)
    rows, summary = [], []
    examples = []
    for e in args.epsilons.split(","):
        eps = 0.0 if e.strip() == "none" else float(e)
        client = InferDPT(llm, tok, perturber, eps, seed=args.seed)
        res = client(questions, llm)
        answers = [r.answer for r in res]
        row = (e.strip(), rouge_l(answers, reference), rouge_l(answers, corpus),
               float(np.mean([r.unchanged for r in res])), res[0].seconds)
        rows.append(row)
        examples.append((e.strip(), res[0].perturbed_prompt, res[0].answer))
        print(row, flush=True)
    rows.append(("non-private (remote sees the question)", 1.0, rouge_l(reference, corpus),
                 1.0, base_s))
    table = C.markdown_table(
        ["epsilon per token", "ROUGE-L vs non-private answer", "ROUGE-L vs corpus answer",
         "prompt tokens unchanged", "seconds per query"], rows)
    ex = C.markdown_table(["epsilon", f"what the remote saw for: {questions[0]!r}",
                           "final answer"],
                          [(e, p.replace("|", "/").replace("\n", " "),
                            a.replace("|", "/").replace("\n", " ")[:120])
                           for e, p, a in examples])
    body = "\n".join([
        f"{args.queries} ChatterBot questions (seed {args.seed}), greedy decoding, "
        f"{args.max_new_tokens} new tokens per generation, RANTEXT top-k {args.top_k}; local "
        f"and remote model `{args.model}`.", "", table, "", "Example:", "", ex])
    by = {r[0]: r for r in rows}
    summary = [(f"InferDPT ROUGE-L vs non-private answer at epsilon {e}",
                f"{by[e][1]:.3f} ({by[e][3]:.0%} tokens unchanged)")
               for e in by if e in args.epsilons.split(",")]
    summary.append(("InferDPT seconds per query (private / non-private)",
                    f"{rows[0][4]:.1f} / {base_s:.1f}"))
    notes = ["Seconds per query: perturbation + remote generation + local extraction "
             "(two generations) vs one generation for the non-private answer; one pass, "
             "shared CPU box.",
             "Small sample (real-model budget): ROUGE-L differences of a few points are "
             "within noise."]
    C.emit(NAME, "InferDPT private inference: utility vs epsilon", body, C.command_line(),
           notes, write=not args.no_write, summary=summary)


if __name__ == "__main__":
    main()
