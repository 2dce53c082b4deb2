"""The Flower ClientApp: run config + node config -> the algorithm's NumPyClient.

Node config (``flower-supernode --node-config "..."``, or the simulation's defaults):

- ``partition-id`` / ``num-partitions``: this node's slice of the shared ``dataset``
  (simulation, and deployments that partition one dataset);
- ``data-path`` (+ optional ``text-column`` / ``label-column`` / ``instruction-column`` /
  ``input-column`` / ``output-column``): this organisation's own file, read whole, nothing
  partitioned (see :func:`fatellm_flwr.data.node_local_config`);
- ``device``: overrides the run config's ``device`` on this node;
- ``num-threads``: CPU threads for torch on this node (overrides the run config's
  ``num-threads``; 0 = torch's default), see :func:`node_threads`.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from flwr.app import Context
from flwr.client import Client, ClientApp, NumPyClient

from .algorithms import get_algorithm
from .config import Config
from .data import NODE_LOCAL, EmptyPartitionError, node_local_config
from .device import node_device, resolve_device
from .logging_setup import configure as configure_logging
from .logging_setup import quiet_known_noise
from .mods import CLIENT_MODS
from .wire.common import METRIC_SKIPPED

log = logging.getLogger(__name__)
quiet_known_noise()  # before the libraries that warn are imported by the client


def node_partition(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config (simulation and deployment)."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as e:
        raise KeyError(
            f"node config lacks {e.args[0]!r}: start each SuperNode with "
            "--node-config \"partition-id=<i> num-partitions=<n>\", or name its own data "
            "with --node-config \"data-path=/path/to/data.jsonl\"") from e


def node_setup(context: Context) -> tuple[Config, int, int]:
    """``(config, partition id, num partitions)`` of this node.

    A node with its own ``data-path`` gets ``num_partitions = NODE_LOCAL`` and, unless its
    node config gives a ``partition-id``, an id derived from its Flower node id (used for
    seeds and logs only).
    """
    cfg = Config.from_run_config(context.run_config)
    node = context.node_config
    local = node_local_config(cfg, node)
    if local is not None:
        cfg = local
        partition_id = int(node.get("partition-id", context.node_id % 2**31))
        num_partitions = NODE_LOCAL
    else:
        partition_id, num_partitions = node_partition(context)
    device = node_device(cfg.device, node)
    resolve_device(device)  # a GPU this node lacks: fail here, with what it has
    if device != cfg.device:
        cfg = cfg.replace(device=device)
    return cfg, partition_id, num_partitions


def node_threads(cfg: Config, node_config) -> int:
    """CPU threads for torch on this node: node config ``num-threads`` (a SuperNode's own
    resources), else the run config's ``num-threads``; 0 leaves torch's default."""
    value = node_config.get("num-threads", cfg.num_threads)
    try:
        threads = int(value)
    except (TypeError, ValueError):
        threads = -1
    if threads < 0 or isinstance(value, bool) or (isinstance(value, float)
                                                   and not value.is_integer()):
        raise ValueError(f"node config num-threads={value!r} must be an integer >= 0 "
                         "(0 = torch's default)")
    return threads


class SkippedClient(NumPyClient):
    """Answers for a node with nothing to train on: no arrays, 0 examples and the reason
    (the server logs it and leaves the node out of the round instead of failing it)."""

    def __init__(self, partition_id: int, reason: str):
        self.partition_id = partition_id
        self.reason = reason

    def get_parameters(self, config) -> list[np.ndarray]:
        return []

    def fit(self, parameters, config):
        return [], 0, {METRIC_SKIPPED: self.reason, "partition-id": self.partition_id}

    def evaluate(self, parameters, config):
        return math.nan, 0, {METRIC_SKIPPED: self.reason, "partition-id": self.partition_id}


def client_fn(context: Context) -> Client:
    cfg, partition_id, num_partitions = node_setup(context)
    configure_logging(cfg.log_level)
    threads = node_threads(cfg, context.node_config)
    if threads > 0:
        torch.set_num_threads(threads)
    client_cls = get_algorithm(cfg).client_class()
    try:
        client = client_cls(cfg, partition_id, num_partitions, context=context)
    except EmptyPartitionError as e:
        log.warning("partition %s: nothing to train on, skipped: %s", partition_id, e)
        client = SkippedClient(partition_id, str(e))
    return client.to_client()


app = ClientApp(client_fn=client_fn, mods=CLIENT_MODS)
