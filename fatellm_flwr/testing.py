"""Tiny randomly initialised causal LMs for smoke tests, notebooks and benchmarks.

Each architecture family we support (Llama, GPT-2, Qwen2, OPT, Gemma3) gets a
model of a few hundred thousand parameters plus a small word-level tokenizer
trained on the fly, saved with ``save_pretrained`` so the real loading code
(:func:`fatellm_flwr.models.load_model`) reads it like any local checkpoint.

Also the two Flower stand-ins that strategy tests drive a strategy with:
:class:`FakeProxy` and :class:`FakeClientManager`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ARCHITECTURES = ("llama", "gpt2", "qwen2", "opt", "gemma3")


class FakeProxy:
    """A ``ClientProxy`` as strategies see it: a client id (= node id)."""

    def __init__(self, cid: str):
        self.cid = cid
        self.node_id = cid


class FakeClientManager:
    """The calls Flower's strategies make on a ``ClientManager``: ``n`` clients with ids
    ``"0".."n-1"`` (or the given ids), sampled in order."""

    def __init__(self, clients: int | list[str]):
        cids = [str(i) for i in range(clients)] if isinstance(clients, int) else clients
        self.proxies = [FakeProxy(c) for c in cids]

    def num_available(self) -> int:
        return len(self.proxies)

    def wait_for(self, num_clients: int, timeout: int = 0) -> bool:
        return len(self.proxies) >= num_clients

    def sample(self, num_clients, min_num_clients=None, criterion=None) -> list[FakeProxy]:
        return self.proxies[:num_clients]

_CORPUS = (
    "the quick brown fox jumps over the lazy dog . "
    "business sport politics tech entertainment news article topic label answer "
    "question what is the capital of france ? paris is the capital . "
    "shares rose in trading ; the team won the match ; the minister said ; "
    "a new phone was released ; the film got an award . hello how are you ? i am fine ."
)


def build_tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes, no unknowns) trained on a fixed corpus.

    Byte-level BPE is what GPT-2/Qwen2 use, so transformers' per-family tokenizer classes
    (which rebuild the tokenizer from vocab + merges) reload it unchanged.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<unk>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        bos_token="<bos>",
    )


def tiny_config(arch: str, vocab_size: int, num_layers: int = 4, hidden: int = 32):
    """A transformers config of the given family with a tiny width and depth."""
    common = dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=3)
    if arch == "llama":
        return transformers.LlamaConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False, **common,
        )
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_embd=hidden, n_layer=num_layers, n_head=4, n_positions=256,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    if arch == "qwen2":
        return transformers.Qwen2Config(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=True, **common,
        )
    if arch == "opt":
        return transformers.OPTConfig(
            hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=num_layers,
            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=hidden,
            dropout=0.0, attention_dropout=0.0, **common,
        )
    if arch == "gemma3":
        return transformers.Gemma3TextConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=256, sliding_window=64, **common,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; allowed: {', '.join(ARCHITECTURES)}")


def build_tiny_model(
    arch: str, out_dir: str | Path, num_layers: int = 4, hidden: int = 32, seed: int = 0
) -> Path:
    """Save a tiny random causal LM of family ``arch`` and its tokenizer to ``out_dir``."""
    out = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(arch, len(tokenizer), num_layers=num_layers, hidden=hidden)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
