import json
import logging

import numpy as np
import pandas as pd
import pytest

from fatellm_flwr.config import Config
from fatellm_flwr.data import (
    DataError,
    TaskData,
    build_federated_data,
    encode_example,
    label_distribution,
    load_raw_dataset,
    resolve_task,
)
from fatellm_flwr.models import load_tokenizer

LABELS = ["sport", "business", "tech", "politics"]


def write_classification(path, n=200, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"text": f"article number {i} about {LABELS[i % 4]}", "label": LABELS[i % 4],
             "category": f"src{rng.integers(0, 6)}"} for i in range(n)]
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_file_formats(tmp_path, suffix):
    path = write_classification(tmp_path / f"d{suffix}", n=40)
    ds = load_raw_dataset(Config.from_run_config({"dataset": str(path)}))
    assert len(ds) == 40 and {"text", "label"} <= set(ds.column_names)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_raw_dataset(Config.from_run_config({"dataset": str(tmp_path / "none.jsonl")}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="could not read dataset file"):
        load_raw_dataset(Config.from_run_config({"dataset": str(bad)}))
    odd = tmp_path / "data.txt"
    odd.write_text("x")
    with pytest.raises(DataError, match="suffix '.txt'"):
        load_raw_dataset(Config.from_run_config({"dataset": str(odd)}))


@pytest.mark.parametrize("name, content, pattern", [
    ("empty.jsonl", b"", r"'.*empty.jsonl' is empty \(0 bytes\)"),
    ("empty.csv", b"", r"'.*empty.csv' is empty \(0 bytes\)"),
    ("blank.jsonl", b"\n  \n", r"'.*blank.jsonl' contains only whitespace"),
    ("none.json", b"[]", r"'.*none.json' has no rows"),
    ("header.csv", b"text,label\n", r"'.*header.csv' has no rows"),
])
def test_empty_files_say_they_are_empty(tmp_path, name, content, pattern):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=pattern) as err:
        load_raw_dataset(Config.from_run_config({"dataset": str(tmp_path / name)}))
    assert "StopIteration" not in str(err.value)


def test_non_utf8_csv_names_file_encoding_and_byte_position(tmp_path):
    path = tmp_path / "latin1.csv"
    rows = "text,label\n" + "".join(f"row {i},a\n" for i in range(30000)) + "caf\u00e9,b\n"
    path.write_bytes(rows.encode("latin-1"))  # > 1 MiB to the bad byte: crosses a read chunk
    pos = rows.encode("latin-1").index(b"\xe9")
    with pytest.raises(DataError) as err:
        load_raw_dataset(Config.from_run_config({"dataset": str(path)}))
    msg = str(err.value)
    assert "latin1.csv" in msg and "not valid UTF-8" in msg and "byte(s) e9" in msg
    assert f"byte offset {pos} (line 30002)" in msg and "DatasetGenerationError" not in msg
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes('{"text": "x", "label": "a"}\n'.encode("utf-16"))
    with pytest.raises(DataError, match=r"utf16.jsonl' is not valid UTF-8: .* offset 0 .*UTF-16"):
        load_raw_dataset(Config.from_run_config({"dataset": str(utf16)}))
    # a multi-byte UTF-8 character split across the read chunk boundary is fine
    ok = tmp_path / "ok.csv"
    ok.write_bytes(b"text,label\n" + b"x" * ((1 << 20) - 12) + "\u00e9,a\nb,c\n".encode())
    assert len(load_raw_dataset(Config.from_run_config({"dataset": str(ok)}))) == 2


def test_task_auto_logs_what_it_picked_and_why(caplog):
    with caplog.at_level(logging.INFO, logger="fatellm_flwr.data"):
        assert resolve_task(Config(dataset="mine.jsonl"), ["text", "source"]) == "lm"
    msg = caplog.text
    assert "task=auto picked task='lm'" in msg and "'mine.jsonl'" in msg
    assert "['text', 'source']" in msg and "not instruction" in msg
    assert "classification (needs ['text', 'label'])" in msg
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fatellm_flwr.data"):
        resolve_task(Config(task="lm"), ["text"])
    assert "picked" not in caplog.text  # an explicit task is not announced


def test_silent_fallbacks_warn(caplog):
    import datasets

    from fatellm_flwr.data import _stratified_subset

    ds = datasets.Dataset.from_dict({"text": [str(i) for i in range(9)],
                                     "label": ["a"] * 8 + ["b"]}).class_encode_column("label")
    with caplog.at_level(logging.WARNING, logger="fatellm_flwr.data"):
        sub = _stratified_subset(ds, 4, "label", seed=0)
    assert len(sub) == 4
    assert "max-examples=4: a subset stratified by 'label' is impossible" in caplog.text
    assert "random subset" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fatellm_flwr.data"):
        assert len(_stratified_subset(ds.select(range(8)), 4, "label", seed=0)) == 4
    assert caplog.text == ""  # one class: stratifying works, nothing to warn about


def test_unstratifiable_test_set_warns(tmp_path, caplog):
    from fatellm_flwr.data import split_pool_and_test

    path = tmp_path / "skewed.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": "b" if i == 0 else "a"})
                              for i in range(20)))
    cfg = Config.from_run_config({"dataset": str(path), "test-size": 5, "seed": 3})
    with caplog.at_level(logging.WARNING, logger="fatellm_flwr.data"):
        _, pool, test, _ = split_pool_and_test(cfg)
    assert len(pool) == 15 and len(test) == 5
    assert "test-size=5: a held-out set stratified by 'label' is impossible" in caplog.text


def test_partition_too_small_for_validation_warns(tmp_path, caplog):
    path = write_classification(tmp_path / "d.jsonl", n=12)
    cfg = Config.from_run_config({"dataset": str(path), "test-size": 0, "partitioner": "iid"})
    fed = build_federated_data(cfg, 2)
    with caplog.at_level(logging.WARNING, logger="fatellm_flwr.data"):
        train, val = fed.client_split(0, 0.1, seed=0)
    assert len(train) == 6 and len(val) == 0
    assert "partition 0: val-fraction=0.1 of its 6 examples leaves no validation" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fatellm_flwr.data"):
        fed.client_split(0, 0.0, seed=0)  # asked for none: nothing to warn about
    assert caplog.text == ""


def test_task_resolution_and_wrong_columns():
    cfg = Config()
    assert resolve_task(cfg, ["text", "label"]) == "classification"
    assert resolve_task(cfg, ["instruction", "output", "input"]) == "instruction"
    assert resolve_task(cfg, ["text"]) == "lm"
    with pytest.raises(DataError, match=r"has columns \['question', 'answer'\]"):
        resolve_task(cfg, ["question", "answer"])
    with pytest.raises(DataError, match=r"needs columns \['label'\]"):
        resolve_task(cfg.replace(task="classification"), ["text"])


def _cfg(path, **kw):
    return Config.from_run_config({"dataset": str(path), "test-size": 20, **kw})


def test_iid_partitions_cover_the_pool_and_hold_out_the_test_set(tmp_path):
    path = write_classification(tmp_path / "d.jsonl")
    data = build_federated_data(_cfg(path, partitioner="iid"), 4)
    sizes = [len(data.partition(i)) for i in range(4)]
    assert sum(sizes) == len(data.pool) == 180 and len(data.test) == 20
    test_texts = set(data.test["text"])
    assert not test_texts & set(data.pool["text"])
    # stratified test set: every label present
    assert set(data.test["label"]) == set(LABELS)
    train, val = data.client_split(0, 0.2, seed=0)
    assert len(val) == int(sizes[0] * 0.2) and len(train) + len(val) == sizes[0]


def test_server_validation_set_is_disjoint_and_leaves_the_test_set_unchanged(tmp_path):
    from fatellm_flwr.data import server_eval_sets, server_val_set

    path = write_classification(tmp_path / "d.jsonl")
    _, test_before = server_eval_sets(_cfg(path))
    assert server_val_set(_cfg(path))[1].num_rows == 0  # off by default
    cfg = _cfg(path, **{"server-val-size": 16, "partitioner": "iid"})
    task, val = server_val_set(cfg)
    _, test = server_eval_sets(cfg)
    data = build_federated_data(cfg, 4)
    assert task.task == "classification" and len(val) == 16 and set(val["label"]) == set(LABELS)
    assert test["text"] == test_before["text"]  # the same test set with or without it
    assert len(data.pool) == 200 - 20 - 16
    assert not set(val["text"]) & (set(test["text"]) | set(data.pool["text"]))
    # server-eval-dataset: test-size examples for the test, server-val-size more for val
    own = write_classification(tmp_path / "own.jsonl", n=100, seed=1)
    cfg = _cfg(path, **{"server-val-size": 10, "server-eval-dataset": str(own)})
    _, own_test = server_eval_sets(cfg)
    _, own_val = server_val_set(cfg)
    assert (len(own_test), len(own_val)) == (20, 10)
    assert not set(own_val["text"]) & set(own_test["text"])
    with pytest.raises(DataError, match="server-val-size=190 leave no training data"):
        build_federated_data(_cfg(path, **{"server-val-size": 190}), 2)


def test_dirichlet_skews_labels(tmp_path):
    path = write_classification(tmp_path / "d.jsonl", n=400)
    skew = build_federated_data(_cfg(path, partitioner="dirichlet", **{"dirichlet-alpha": 0.1}), 4)
    iid = build_federated_data(_cfg(path, partitioner="iid"), 4)

    def max_share(data):
        shares = []
        for i in range(4):
            counts = label_distribution(data.partition(i), "label")
            shares.append(max(counts.values()) / sum(counts.values()))
        return float(np.mean(shares))

    assert max_share(skew) > max_share(iid) + 0.2


def test_pathological_and_natural(tmp_path):
    path = write_classification(tmp_path / "d.jsonl", n=400)
    data = build_federated_data(_cfg(path, partitioner="pathological",
                                     **{"classes-per-client": 1}), 4)
    for i in range(4):
        assert len(label_distribution(data.partition(i), "label")) == 1
    nat = build_federated_data(_cfg(path, partitioner="natural",
                                    **{"partition-column": "category"}), 6)
    cats = [set(nat.partition(i)["category"]) for i in range(6)]
    assert all(len(c) == 1 for c in cats) and len(set.union(*cats)) == 6
    grouped = build_federated_data(_cfg(path, partitioner="natural",
                                        **{"partition-column": "category"}), 3)
    assert all(len(set(grouped.partition(i)["category"])) == 2 for i in range(3))
    with pytest.raises(DataError, match="cannot group the 6 values"):
        build_federated_data(_cfg(path, partitioner="natural",
                                  **{"partition-column": "category"}), 4)


def test_more_clients_than_examples_is_a_clear_error(tmp_path):
    path = write_classification(tmp_path / "d.jsonl", n=30)
    # (issue 8) more clients than examples: the empty partitions' clients are skipped
    data = build_federated_data(_cfg(path, partitioner="iid", **{"test-size": 5}), 50)
    with pytest.raises(DataError, match="partition 49 of 50 is empty"):
        data.partition(49)
    with pytest.raises(DataError, match="test-size=40 leaves no training data"):
        build_federated_data(_cfg(path, **{"test-size": 40}), 2)


def test_encoding_masks_the_prompt_and_keeps_the_answer(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir("llama")))
    cfg = Config.from_run_config({"max-length": 160})
    td = TaskData("classification", ("business", "sport"))
    row = {"text": "the team won the match " * 20, "label": "sport"}
    enc = encode_example(tok, cfg, td, row)
    assert len(enc["input_ids"]) <= 160
    target = [t for t in enc["labels"] if t != -100]
    assert tok.decode(target).startswith("sport")
    # the instruction after the (shortened) article survives truncation
    prompt = tok.decode(enc["input_ids"][: len(enc["labels"]) - len(target)])
    assert prompt.rstrip().endswith("Answer with the category only.")
    inst = TaskData("instruction", ())
    enc = encode_example(tok, cfg, inst, {"instruction": "what is the capital of france ?",
                                          "output": "paris is the capital .", "input": ""})
    assert tok.decode([t for t in enc["labels"] if t != -100]).startswith("paris is the capital")
    lm = encode_example(tok, cfg, TaskData("lm", ()), {"text": "hello how are you ?"})
    assert lm["labels"] == lm["input_ids"]


def test_max_length_without_room_for_the_text_warns_once(tiny_model_dir, caplog):
    import datasets

    from fatellm_flwr import data as data_mod
    from fatellm_flwr.data import tokenize_dataset

    tok = load_tokenizer(str(tiny_model_dir("llama")))
    td = TaskData("classification", ("business", "sport"))
    rows = datasets.Dataset.from_list([{"text": "the team won the match " * 20,
                                        "label": "sport"}] * 3)
    roomy = Config.from_run_config({"max-length": 160})
    overhead = data_mod.warn_if_no_room_for_text(tok, roomy, td, rows[0])
    assert 20 < overhead < 140  # the instruction alone, without the article
    with caplog.at_level(logging.WARNING, logger="fatellm_flwr.data"):
        tokenize_dataset(rows, tok, roomy, td)
        assert "leaves" not in caplog.text
        tight = Config.from_run_config({"max-length": overhead})
        tokenize_dataset(rows, tok, tight, td)
        tokenize_dataset(rows, tok, tight, td)  # a second client: no second warning
    warnings = [r.getMessage() for r in caplog.records if "leaves" in r.getMessage()]
    assert len(warnings) == 1
    assert f"max-length={overhead} leaves 0 token(s) for the text" in warnings[0]
    assert f"prompt around it takes {overhead} tokens" in warnings[0]
