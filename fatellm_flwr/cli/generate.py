"""``fatellm generate``: completions from a run's model, with its tokenizer and chat template."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..data import render_prompt
from .runs import load_run_model, run_config


def generate(run: str | Path, prompts: Sequence[str], max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 50, repetition_penalty: float = 1.0, chat: bool | None = None,
             seed: int | None = None, device: str = "cpu", loaded=None) -> list[str]:
    """Completions of ``prompts`` by the run's model (sampling options as in transformers'
    ``generate``; greedy by default). ``chat=None`` follows the run's
    ``use-chat-template``. ``loaded`` reuses a ``load_run_model`` result."""
    if not prompts:
        return []
    model, tokenizer, manifest = loaded or load_run_model(run, device)
    folder = Path(manifest["folder"])
    use_chat = run_config(folder.parent).use_chat_template if chat is None else chat
    texts = [render_prompt(tokenizer, p, use_chat) for p in prompts]
    if seed is not None:
        torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    device_ = next(model.parameters()).device
    enc = {k: v.to(device_) for k, v in enc.items()}
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             repetition_penalty=repetition_penalty,
                             pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
