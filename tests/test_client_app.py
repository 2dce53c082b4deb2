"""ClientApp helpers: the thread count a node gives torch."""

import pytest

from fatellm_flwr.client_app import node_threads
from fatellm_flwr.config import Config


def test_threads_from_run_config_overridden_by_node_config():
    assert node_threads(Config(), {}) == 1  # the run config's default
    cfg = Config.from_run_config({"num-threads": 2})
    assert node_threads(cfg, {"partition-id": 0}) == 2  # simulation: no node key
    assert node_threads(cfg, {"num-threads": 8}) == 8  # a SuperNode's own resources
    assert node_threads(cfg, {"num-threads": 0}) == 0  # torch's default
    for bad in (-1, "many", 1.5, True):
        with pytest.raises(ValueError, match=r"node config num-threads=.* must be an integer"):
            node_threads(cfg, {"num-threads": bad})
