"""The registry: algorithm name -> (server strategy, client). The one place to add one."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .config import ALGORITHMS, Config, ConfigError


@dataclass(frozen=True)
class Algorithm:
    """Where an algorithm's strategy and client classes live (imported lazily)."""

    name: str
    strategy: str  # "module:Class" under fatellm_flwr
    client: str

    def _load(self, ref: str):
        module, cls = ref.split(":")
        return getattr(importlib.import_module(f"fatellm_flwr.{module}"), cls)

    def strategy_class(self):
        return self._load(self.strategy)

    def client_class(self):
        return self._load(self.client)


REGISTRY: dict[str, Algorithm] = {
    "homo": Algorithm("homo", "strategies.homo:HomoStrategy", "clients.homo:HomoClient"),
    "offsite": Algorithm("offsite", "strategies.offsite:OffsiteStrategy",
                         "clients.offsite:OffsiteClient"),
    "fedkseed": Algorithm("fedkseed", "strategies.fedkseed:FedKSeedStrategy",
                          "clients.fedkseed:FedKSeedClient"),
    "fedmkt": Algorithm("fedmkt", "strategies.fedmkt:FedMKTStrategy",
                        "clients.fedmkt:FedMKTClient"),
    "inferdpt": Algorithm("inferdpt", "strategies.inferdpt:InferDPTStrategy",
                          "clients.inferdpt:InferDPTClient"),
}


def get_algorithm(cfg: Config) -> Algorithm:
    if cfg.algorithm not in REGISTRY:
        raise ConfigError(f"algorithm {cfg.algorithm!r} is not available; allowed: "
                          f"{', '.join(a for a in ALGORITHMS if a in REGISTRY)}")
    return REGISTRY[cfg.algorithm]
