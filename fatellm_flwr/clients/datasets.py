"""A client's share of the data: its partition, split and tokenized once per process."""

from __future__ import annotations

import weakref

from ..config import Config
from ..data import federated_data, tokenize_dataset

# tokenizer -> {settings: tokenized data}. Keyed by the tokenizer object itself (weakly), not
# by ``id(tokenizer)``: one actor serves clients of different SLMs and keeps one model at a
# time, so a freed tokenizer's id can be reused by another model's tokenizer, whose clients
# would then get token ids of the wrong vocabulary.
_TOKENIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def per_tokenizer(cache: weakref.WeakKeyDictionary, tokenizer) -> dict:
    """``tokenizer``'s own slot of ``cache``: it lives exactly as long as the tokenizer."""
    slot = cache.get(tokenizer)
    if slot is None:
        slot = cache[tokenizer] = {}
    return slot


def client_datasets(cfg: Config, tokenizer, partition_id: int, num_partitions: int):
    """``(task_data, train, val_raw, val)`` of one partition, tokenized once per process.

    Flower builds a new client object for every message; the simulation engine's actors
    live across rounds, so the partition is split and tokenized only on first use (per
    tokenizer object, see :func:`per_tokenizer`).
    """
    cached = per_tokenizer(_TOKENIZED, tokenizer)
    key = (partition_id, num_partitions, cfg.max_length, cfg.val_fraction,
           cfg.prompt_template, cfg.use_chat_template, cfg.dataset, cfg.seed)
    if key not in cached:
        data = federated_data(cfg, num_partitions)
        train, val = data.client_split(partition_id, cfg.val_fraction, cfg.seed)
        cached[key] = (data.task_data, tokenize_dataset(train, tokenizer, cfg, data.task_data),
                       val, tokenize_dataset(val, tokenizer, cfg, data.task_data))
    return cached[key]
