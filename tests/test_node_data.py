"""Each organisation's own data (node config `data-path`), the agreed label set, the
server's own evaluation set, and clients with nothing to train on (skipped, not failed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fatellm_flwr.client_app import SkippedClient, client_fn, node_setup
from fatellm_flwr.config import Config, ConfigError
from fatellm_flwr.data import (
    NODE_LOCAL,
    DataError,
    EmptyPartitionError,
    federated_data,
    node_local_config,
    server_eval_sets,
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def org_file(path: Path, labels: list[str], n: int = 12, text_key="text", label_key="label"):
    return write_jsonl(path, [{text_key: f"{labels[i % len(labels)]} news item {i}",
                               label_key: labels[i % len(labels)]} for i in range(n)])


def context(node_config: dict, run_config: dict, node_id: int = 77) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(),
                   run_config=run_config)


# ----------------------------------------------------------------------------- node config
def test_no_data_path_keeps_partitioning(tmp_path):
    assert node_local_config(Config(), {"partition-id": 0, "num-partitions": 2}) is None


def test_data_path_and_own_column_names(tmp_path):
    f = org_file(tmp_path / "org-a.jsonl", ["sport", "tech"], text_key="body", label_key="y")
    cfg = node_local_config(Config(labels="business,sport,tech"),
                            {"data-path": str(f), "text-column": "body", "label-column": "y"})
    assert (cfg.dataset, cfg.text_column, cfg.label_column, cfg.test_size) == \
        (str(f), "body", "y", 0)
    data = federated_data(cfg, NODE_LOCAL)
    train, val = data.client_split(123456, cfg.val_fraction, cfg.seed)  # any id: whole file
    assert len(train) + len(val) == 12 and len(data.test) == 0
    # the agreed label set, in the agreed order, even though this node has no 'business'
    assert data.task_data.label_names == ("business", "sport", "tech")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="data-path='/nope/org.jsonl': no such file"):
        node_local_config(Config(), {"data-path": "/nope/org.jsonl"})


def test_classification_on_own_data_needs_the_agreed_labels(tmp_path):
    f = org_file(tmp_path / "org.jsonl", ["sport", "tech"])
    cfg = node_local_config(Config(), {"data-path": str(f)})
    with pytest.raises(DataError, match="labels='business,sport,tech'"):
        federated_data(cfg, NODE_LOCAL)


def test_a_label_outside_the_agreed_set_stops_the_client(tmp_path):
    f = org_file(tmp_path / "org.jsonl", ["sport", "weather"])
    cfg = node_local_config(Config(labels="business,sport,tech"), {"data-path": str(f)})
    with pytest.raises(DataError, match=r"label\(s\) \['weather'\] outside the agreed label "
                                        r"set \['business', 'sport', 'tech'\]"):
        federated_data(cfg, NODE_LOCAL)


def test_labels_key_is_validated():
    with pytest.raises(ConfigError, match="'labels' has value 'sport'; it must name at least 2"):
        Config.from_run_config({"labels": "sport"})
    assert Config(labels=" b, a ,b,").label_list == ("b", "a")
    with pytest.raises(ConfigError, match="'node-data-path' .* must contain '{partition-id}'"):
        Config.from_run_config({"node-data-path": "data/org.jsonl"})


def test_node_data_path_template_gives_each_simulated_node_its_file(tmp_path):
    for i in range(2):
        org_file(tmp_path / f"org-{i}.jsonl", ["sport", "tech"], n=6 + i)
    run = {"node-data-path": str(tmp_path / "org-{partition-id}.jsonl"),
           "labels": "sport,tech"}
    for i in range(2):
        cfg, pid, n = node_setup(context({"partition-id": i, "num-partitions": 2}, run))
        assert (cfg.dataset, pid, n) == (str(tmp_path / f"org-{i}.jsonl"), i, NODE_LOCAL)
        assert len(federated_data(cfg, n).partition(pid)) == 6 + i


def test_deployment_node_without_partition_id_gets_one_from_its_node_id(tmp_path):
    f = org_file(tmp_path / "org.jsonl", ["sport", "tech"])
    cfg, pid, n = node_setup(context({"data-path": str(f), "device": "cpu"},
                                     {"labels": "sport,tech", "device": "auto"}, node_id=2**40 + 5))
    assert (pid, n, cfg.device) == ((2**40 + 5) % 2**31, NODE_LOCAL, "cpu")


# ----------------------------------------------------------------------------- server side
def test_server_eval_sets(tmp_path, tiny_classification_file):
    base = Config(dataset=str(tiny_classification_file), test_size=10)
    task, test = server_eval_sets(base)
    assert len(test) == 10 and task.label_names == ("business", "sport", "tech")
    task, test = server_eval_sets(base.replace(server_eval_dataset="none"))
    assert task is None and len(test) == 0
    own = org_file(tmp_path / "server.jsonl", ["business", "sport", "tech"], n=30)
    task, test = server_eval_sets(base.replace(server_eval_dataset=str(own)))
    assert len(test) == 10 and set(test["text"]) <= {json.loads(x)["text"] for x in
                                                     own.read_text().splitlines()}
    with pytest.raises(DataError, match=r"\['business'\] outside the agreed label set"):
        server_eval_sets(base.replace(server_eval_dataset=str(own), labels="sport,tech"))


# ----------------------------------------------------------------------------- skipping
def test_more_partitions_than_examples_leaves_empty_ones(tiny_classification_file):
    cfg = Config(dataset=str(tiny_classification_file), test_size=10, partitioner="iid")
    data = federated_data(cfg, 200)  # 110 examples for 200 clients
    assert len(data.partition(0)) == 1
    with pytest.raises(EmptyPartitionError, match="partition 199 of 200 is empty"):
        data.partition(199)


def test_client_with_empty_partition_is_skipped(tiny_model_dir, tiny_classification_file):
    run = {"model": str(tiny_model_dir("llama")), "dataset": str(tiny_classification_file),
           "test-size": 10, "partitioner": "iid", "max-length": 32}
    client = client_fn(context({"partition-id": 150, "num-partitions": 200}, run))
    ins_params = ndarrays_to_parameters([np.zeros(2, np.float32)])
    from flwr.common import FitIns

    res = client.fit(FitIns(ins_params, {"server-round": 1}))
    assert res.num_examples == 0 and parameters_to_ndarrays(res.parameters) == []
    assert "partition 150 of 200 is empty" in res.metrics["skipped"]


def test_server_logs_and_counts_skipped_clients(tmp_path, caplog):
    from fatellm_flwr.outputs import RunDir
    from fatellm_flwr.strategies.base import TrackedStrategy
    from fatellm_flwr.strategies.homo import build_aggregator
    from fatellm_flwr.testing import FakeProxy

    initial = [np.zeros((2, 2), np.float32)]
    cfg = Config.from_run_config({"server-eval": False})
    s = TrackedStrategy(cfg, build_aggregator(cfg, initial), RunDir(tmp_path / "run"), initial,
                        full_model_bytes=1)
    _, _, skip_metrics = SkippedClient(7, "partition 7 of 9 is empty").fit([], {})
    good = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.ones((2, 2), np.float32)]), 5,
                  {})
    skipped = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([]), 0, skip_metrics)
    with caplog.at_level("INFO"):
        params, _ = s.aggregate_fit(1, [(FakeProxy("a"), good), (FakeProxy("b"), skipped)], [])
    np.testing.assert_array_equal(parameters_to_ndarrays(params)[0], np.ones((2, 2)))
    assert s._pending[1]["clients_skipped"] == 1 and s._pending[1]["clients_failed"] == 0
    assert "skipped: partition 7 of 9 is empty" in caplog.text
