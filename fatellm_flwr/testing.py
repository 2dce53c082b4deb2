"""Tiny randomly initialised causal LMs for smoke tests, notebooks and benchmarks.

Each architecture family we support (Llama, GPT-2, Qwen2, OPT, Gemma3; and for layout
tests GPT-NeoX, MPT, Falcon, Bloom, Phi, GPT-J, GPT-Neo, Mistral, StableLM) gets a
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
# More decoder layouts (block lists under other paths, other per-layer metadata), for the tests
# of code that must work on any causal LM (offsite-tuning's layer drop, IA3/LoRA targets).
MORE_ARCHITECTURES = ("gpt_neox", "mpt", "falcon", "bloom", "phi", "gptj", "gpt_neo",
                      "mistral", "stablelm")


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


def build_tiny_sentencepiece_tokenizer(vocab_size: int = 200) -> PreTrainedTokenizerFast:
    """A sentencepiece-style Unigram tokenizer (``▁`` marks a word start, unseen characters
    become ``<unk>``) with another vocabulary than :func:`build_tiny_tokenizer`: for tests of
    models with different tokenizers (FedMKT). Special token ids match (pad 0, eos 1, bos 3).
    """
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<unk>", "<bos>"],
        unk_token="<unk>")
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", bos_token="<bos>")


TOKENIZERS = {"byte-level": build_tiny_tokenizer,
              "sentencepiece": build_tiny_sentencepiece_tokenizer}


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
    more = _more_config(arch, hidden, num_layers, common)
    if more is not None:
        return more
    raise ValueError(f"unknown tiny architecture {arch!r}; allowed: "
                     f"{', '.join(ARCHITECTURES + MORE_ARCHITECTURES)}")


def _more_config(arch: str, hidden: int, num_layers: int, common: dict):
    """Tiny configs of :data:`MORE_ARCHITECTURES` (``None`` for another name)."""
    t = transformers
    ffn, heads = 2 * hidden, 4
    if arch == "gpt_neox":  # blocks under `gpt_neox.layers`, untied `embed_out`
        return t.GPTNeoXConfig(hidden_size=hidden, intermediate_size=ffn,
                               num_hidden_layers=num_layers, num_attention_heads=heads,
                               max_position_embeddings=256, **common)
    if arch == "mpt":  # blocks under `transformer.blocks`, ALiBi
        return t.MptConfig(d_model=hidden, n_layers=num_layers, n_heads=heads, expansion_ratio=2,
                           max_seq_len=256, **common)
    if arch == "falcon":  # `transformer.h`, multi-query attention
        return t.FalconConfig(hidden_size=hidden, num_hidden_layers=num_layers,
                              num_attention_heads=heads, **common)
    if arch == "bloom":  # `transformer.h`, ALiBi
        return t.BloomConfig(hidden_size=hidden, n_layer=num_layers, n_head=heads, **common)
    if arch == "phi":  # `model.layers`, partial rotary, fc1/fc2
        return t.PhiConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=num_layers,
                           num_attention_heads=heads, max_position_embeddings=256, **common)
    if arch == "gptj":  # `transformer.h`, parallel attention + MLP
        return t.GPTJConfig(n_embd=hidden, n_layer=num_layers, n_head=heads, rotary_dim=4,
                            n_positions=256, **common)
    if arch == "gpt_neo":  # `transformer.h`, per-layer `attention_layers` (global/local)
        return t.GPTNeoConfig(hidden_size=hidden, num_layers=num_layers, num_heads=heads,
                              attention_types=[[["global", "local"], num_layers // 2]]
                              if num_layers % 2 == 0 else [[["global"], num_layers]],
                              window_size=4, max_position_embeddings=256, **common)
    if arch == "mistral":  # grouped-query attention, sliding window
        return t.MistralConfig(hidden_size=hidden, intermediate_size=ffn,
                               num_hidden_layers=num_layers, num_attention_heads=heads,
                               num_key_value_heads=2, sliding_window=4,
                               max_position_embeddings=256, **common)
    if arch == "stablelm":
        return t.StableLmConfig(hidden_size=hidden, intermediate_size=ffn,
                                num_hidden_layers=num_layers, num_attention_heads=heads,
                                num_key_value_heads=2, max_position_embeddings=256, **common)
    return None


def build_tiny_model(
    arch: str, out_dir: str | Path, num_layers: int = 4, hidden: int = 32, seed: int = 0,
    tokenizer: str = "byte-level",
) -> Path:
    """Save a tiny random causal LM of family ``arch`` and its tokenizer (``byte-level`` BPE
    or a ``sentencepiece``-style Unigram, see :data:`TOKENIZERS`) to ``out_dir``."""
    out = Path(out_dir)
    tokenizer = TOKENIZERS[tokenizer]()
    config = tiny_config(arch, len(tokenizer), num_layers=num_layers, hidden=hidden)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
