"""The Flower ClientApp: run config + node config -> the algorithm's NumPyClient."""

from __future__ import annotations

import torch
from flwr.app import Context
from flwr.client import Client, ClientApp

from .algorithms import get_algorithm
from .config import Config
from .mods import CLIENT_MODS


def node_partition(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config (simulation and deployment)."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as e:
        raise KeyError(
            f"node config lacks {e.args[0]!r}: start each SuperNode with "
            "--node-config \"partition-id=<i> num-partitions=<n>\"") from e


def client_fn(context: Context) -> Client:
    cfg = Config.from_run_config(context.run_config)
    partition_id, num_partitions = node_partition(context)
    torch.set_num_threads(max(1, int(context.node_config.get("num-threads", 1))))
    client_cls = get_algorithm(cfg).client_class()
    return client_cls(cfg, partition_id, num_partitions, context=context).to_client()


app = ClientApp(client_fn=client_fn, mods=CLIENT_MODS)
