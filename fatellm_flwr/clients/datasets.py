"""A client's share of the data: its partition, split and tokenized once per process."""

from __future__ import annotations

from ..config import Config
from ..data import federated_data, tokenize_dataset

_TOKENIZED: dict[tuple, tuple] = {}


def client_datasets(cfg: Config, tokenizer, partition_id: int, num_partitions: int):
    """``(task_data, train, val_raw, val)`` of one partition, tokenized once per process.

    Flower builds a new client object for every message; the simulation engine's actors
    live across rounds, so the partition is split and tokenized only on first use.
    """
    key = (id(tokenizer), partition_id, num_partitions, cfg.max_length, cfg.val_fraction,
           cfg.prompt_template, cfg.use_chat_template, cfg.dataset, cfg.seed)
    if key not in _TOKENIZED:
        data = federated_data(cfg, num_partitions)
        train, val = data.client_split(partition_id, cfg.val_fraction, cfg.seed)
        _TOKENIZED[key] = (data.task_data, tokenize_dataset(train, tokenizer, cfg, data.task_data),
                           val, tokenize_dataset(val, tokenizer, cfg, data.task_data))
    return _TOKENIZED[key]
