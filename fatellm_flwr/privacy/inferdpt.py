"""InferDPT private inference with a black-box LLM (pure torch, no Flower import).

Tong et al., "InferDPT: Privacy-preserving Inference for Black-box Large Language Models"
(arXiv 2310.12214). The client never shows its prompt to the remote LLM:

1. **Perturbation (RANTEXT).** Every prompt token ``t`` is replaced by a token drawn with the
   exponential mechanism (McSherry & Talwar 2007) from a random adjacency list of ``t``: the
   ``top_k`` tokens nearest to ``t`` in an embedding table, cut at the distance of a Laplace-
   noised copy of ``t``'s embedding (noise scale ``Delta_f / epsilon``, ``Delta_f`` = the
   table's coordinate range). Utility ``u(t, t') = -||e_t - e_t'||``; a candidate is drawn
   with probability proportional to ``exp(epsilon * u / (2 * Delta_u))``, ``Delta_u`` = the
   utility range over the candidates, so each token costs ``epsilon``.
2. The remote LLM answers the perturbed prompt (any ``Callable[[list[str]], list[str]]``).
3. **Extraction.** The client's local (small) model writes the final answer from its
   *original* prompt and the perturbed answer (:func:`extraction_prompt`).

``python -m fatellm_flwr.privacy.inferdpt --local MODEL --remote MODEL "question" ...`` runs
the whole loop on the command line with Hugging Face models.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

RemoteLLM = Callable[[list[str]], list[str]]

EXTRACTION_TEMPLATE = (
    "Here is a question and a draft answer that was written for a noisy, partly garbled "
    "version of the question. Use the draft only where it helps and answer the original "
    "question.\n\nQuestion: {prompt}\n\nDraft answer: {draft}\n\nAnswer:")


# --------------------------------------------------------------------------- mechanism
def exponential_mechanism_probs(utilities: torch.Tensor, epsilon: float,
                                sensitivity: float) -> torch.Tensor:
    """``P(i) ∝ exp(epsilon * u_i / (2 * sensitivity))`` (McSherry & Talwar 2007)."""
    if epsilon <= 0:
        raise ValueError(f"epsilon={epsilon} must be > 0")
    if sensitivity <= 0:
        return torch.full_like(utilities, 1.0 / utilities.numel())  # all utilities equal
    return torch.softmax(epsilon * utilities.double() / (2 * sensitivity), dim=-1).float()


class Perturber:
    """RANTEXT over an embedding table ``(vocab, dim)``.

    ``allowed`` (bool mask over the vocabulary, default all) excludes tokens that must never
    be drawn, e.g. special tokens; tokens outside it are left unchanged when they occur.
    """

    def __init__(self, embeddings: torch.Tensor, top_k: int = 64,
                 allowed: torch.Tensor | None = None):
        if top_k < 2:
            raise ValueError(f"top_k={top_k} must be >= 2")
        self.emb = embeddings.detach().float().cpu()
        self.allowed = (torch.ones(len(self.emb), dtype=torch.bool) if allowed is None
                        else allowed.bool().cpu())
        self.top_k = min(top_k, int(self.allowed.sum()))
        self.delta_f = float(self.emb.max() - self.emb.min())  # coordinate range
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def neighbourhood(self, token: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, distances)`` of the ``top_k`` allowed tokens nearest to ``token``."""
        if token not in self._cache:
            d = torch.cdist(self.emb[token][None], self.emb)[0]
            d[~self.allowed] = float("inf")
            d[token] = 0.0
            dist, ids = torch.topk(d, self.top_k, largest=False)
            self._cache[token] = (ids, dist)
        return self._cache[token]

    def candidates(self, token: int, epsilon: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """RANTEXT's random adjacency list: neighbours no farther than a Laplace-noised copy
        of the token's embedding (the token itself always belongs)."""
        ids, dist = self.neighbourhood(token)
        lap = torch.distributions.Laplace(0.0, self.delta_f / epsilon)
        u = torch.rand(self.emb.shape[1], generator=generator).clamp(1e-7, 1 - 1e-7)
        noise = lap.icdf(u)  # inverse CDF with our generator: reproducible when seeded
        radius = float(noise.norm())
        keep = dist <= radius
        keep[0] = True
        return ids[keep], dist[keep]

    def sample(self, token: int, epsilon: float, generator: torch.Generator) -> int:
        """One token drawn by the exponential mechanism over the random adjacency list."""
        ids, dist = self.candidates(token, epsilon, generator)
        if len(ids) == 1:
            return int(ids[0])
        utilities = -dist
        probs = exponential_mechanism_probs(utilities, epsilon,
                                            float(dist.max() - dist.min()))
        return int(ids[torch.multinomial(probs, 1, generator=generator)])

    def perturb_ids(self, ids: Sequence[int], epsilon: float,
                    generator: torch.Generator) -> list[int]:
        """Each token replaced independently (``epsilon`` per token); ``epsilon=0`` means no
        perturbation (not private)."""
        if epsilon == 0:
            return list(ids)
        return [self.sample(int(t), epsilon, generator) if self.allowed[int(t)] else int(t)
                for t in ids]


def perturber_for(model: torch.nn.Module, tokenizer, top_k: int = 64) -> Perturber:
    """A :class:`Perturber` over a causal LM's input-embedding table; never drawn: special
    tokens, tokens beyond the tokenizer's vocabulary and byte fragments that do not decode
    to text on their own (they would reach the remote LLM as U+FFFD)."""
    emb = model.get_input_embeddings().weight
    n = min(len(tokenizer), emb.shape[0])
    allowed = torch.zeros(emb.shape[0], dtype=torch.bool)
    allowed[:n] = torch.tensor(["\ufffd" not in t for t in
                                tokenizer.batch_decode([[i] for i in range(n)])])
    allowed[[i for i in tokenizer.all_special_ids if i < emb.shape[0]]] = False
    return Perturber(emb, top_k, allowed)


def perturb_text(text: str, tokenizer, perturber: Perturber, epsilon: float,
                 generator: torch.Generator) -> tuple[str, float]:
    """``(perturbed text, fraction of tokens unchanged)``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    new = perturber.perturb_ids(ids, epsilon, generator)
    same = sum(a == b for a, b in zip(ids, new)) / max(1, len(ids))
    return tokenizer.decode(new, skip_special_tokens=True), same


def extraction_prompt(prompt: str, draft: str) -> str:
    """What the local model sees: the original prompt plus the remote (perturbed) answer."""
    return EXTRACTION_TEMPLATE.format(prompt=prompt.strip(), draft=draft.strip())


# --------------------------------------------------------------------------- pipeline
def hf_generator(model: torch.nn.Module, tokenizer, max_new_tokens: int = 64,
                 use_chat_template: bool = True) -> RemoteLLM:
    """A ``list[str] -> list[str]`` LLM from a Hugging Face causal LM (greedy decoding)."""
    from ..data import render_prompt
    from ..metrics import generate

    def answer(prompts: list[str]) -> list[str]:
        rendered = [render_prompt(tokenizer, p, use_chat_template) for p in prompts]
        return [a.strip() for a in generate(model, tokenizer, rendered, max_new_tokens)]

    return answer


@dataclass
class PrivateAnswer:
    prompt: str
    perturbed_prompt: str
    perturbed_answer: str
    answer: str
    unchanged: float  # fraction of prompt tokens that passed unchanged
    seconds: float  # wall time of this query (perturb + remote + extract), batch share


class InferDPT:
    """The client side: perturb prompts, call the remote LLM, extract the answers."""

    def __init__(self, local: RemoteLLM, tokenizer, perturber: Perturber, epsilon: float,
                 seed: int | None = None):
        self.local, self.tokenizer, self.perturber = local, tokenizer, perturber
        self.epsilon = epsilon
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()  # OS randomness: perturbations must not be predictable
        else:
            self.generator.manual_seed(seed)

    def perturb(self, prompts: Sequence[str]) -> tuple[list[str], list[float]]:
        out = [perturb_text(p, self.tokenizer, self.perturber, self.epsilon, self.generator)
               for p in prompts]
        return [o[0] for o in out], [o[1] for o in out]

    def extract(self, prompts: Sequence[str], drafts: Sequence[str]) -> list[str]:
        return self.local([extraction_prompt(p, d) for p, d in zip(prompts, drafts)])

    def __call__(self, prompts: Sequence[str], remote: RemoteLLM) -> list[PrivateAnswer]:
        t0 = time.perf_counter()
        perturbed, unchanged = self.perturb(prompts)
        drafts = remote(list(perturbed))
        answers = self.extract(prompts, drafts)
        per = (time.perf_counter() - t0) / max(1, len(prompts))
        return [PrivateAnswer(*row, per) for row in
                zip(prompts, perturbed, drafts, answers, unchanged)]


def main(argv: Sequence[str] | None = None) -> int:
    """Ask a remote LLM privately: perturb, answer remotely, extract locally."""
    import argparse

    from ..models import load_base_model, load_tokenizer

    ap = argparse.ArgumentParser(prog="python -m fatellm_flwr.privacy.inferdpt",
                                 description=main.__doc__)
    ap.add_argument("prompts", nargs="+")
    ap.add_argument("--local", default="builtin:smollm2-135m-instruct",
                    help="the client's small model (perturbs and extracts)")
    ap.add_argument("--remote", default="builtin:smollm2-135m-instruct",
                    help="the remote LLM (here loaded locally to stand in for an API)")
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    tok = load_tokenizer(args.local)
    local = load_base_model(args.local, device=args.device)
    remote_tok = tok if args.remote == args.local else load_tokenizer(args.remote)
    remote_model = local if args.remote == args.local else load_base_model(
        args.remote, device=args.device)
    client = InferDPT(hf_generator(local, tok, args.max_new_tokens), tok,
                      perturber_for(local, tok, args.top_k), args.epsilon)
    for r in client(args.prompts, hf_generator(remote_model, remote_tok, args.max_new_tokens)):
        print(f"prompt:           {r.prompt}\nsent (perturbed): {r.perturbed_prompt}\n"
              f"remote answer:    {r.perturbed_answer}\nfinal answer:     {r.answer}\n"
              f"tokens unchanged: {r.unchanged:.0%}   time: {r.seconds:.1f}s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
