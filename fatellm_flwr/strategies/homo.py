"""FedHomoLLM server: aggregate PEFT adapters (FATE-LLM's homo federated PEFT).

Weighted FedAvg (McMahan et al. 2017) over the trainable tensors, FedProx (Li et al.
2020; the proximal term lives on the clients), and adaptive server optimizers FedAdam /
FedYogi / FedAvgM (Reddi et al. 2021; Hsu et al. 2019) — Flower's own implementations,
wrapped by :class:`~fatellm_flwr.strategies.base.TrackedStrategy`.
"""

from __future__ import annotations

import numpy as np
from flwr.server.strategy import FedAdam, FedAvg, FedAvgM, FedYogi, Strategy

from ..config import Config
from ..metrics import evaluate_model
from ..models import count_parameters, load_peft_model, save_adapter, set_trainable_state
from .base import TrackedStrategy
from .client_dp import with_client_dp

_SERVER_LR_DEFAULT = {"fedadam": 1e-2, "fedyogi": 1e-2, "fedavgm": 1.0}


def build_aggregator(cfg: Config, initial: list[np.ndarray]) -> Strategy:
    """Flower's strategy for ``cfg.aggregator`` with the run's sampling settings."""
    from flwr.common import ndarrays_to_parameters

    common = dict(fraction_fit=cfg.fraction_fit, fraction_evaluate=cfg.fraction_evaluate,
                  min_fit_clients=cfg.min_fit_clients,
                  min_evaluate_clients=1 if cfg.fraction_evaluate > 0 else 0,
                  min_available_clients=cfg.min_available_clients,
                  initial_parameters=ndarrays_to_parameters(initial),
                  # metrics are aggregated (and recorded) by TrackedStrategy
                  fit_metrics_aggregation_fn=lambda _: {},
                  evaluate_metrics_aggregation_fn=lambda _: {})
    lr = cfg.server_lr or _SERVER_LR_DEFAULT.get(cfg.aggregator, 1.0)
    if cfg.aggregator in ("fedavg", "fedprox"):
        return FedAvg(**common)
    if cfg.aggregator == "fedavgm":
        return FedAvgM(**common, server_learning_rate=lr, server_momentum=cfg.server_momentum)
    opt = FedAdam if cfg.aggregator == "fedadam" else FedYogi
    return opt(**common, eta=lr, eta_l=cfg.lr, beta_1=cfg.beta1, beta_2=cfg.beta2, tau=cfg.tau)


class HomoStrategy(TrackedStrategy):
    """Server side of federated PEFT: the global adapter, evaluated on the held-out set."""

    def __init__(self, cfg: Config, run, initial: list[np.ndarray] | None = None,
                 round_offset: int = 0, ledger=None, strategy_state=None):
        self.model, self.tokenizer = load_peft_model(cfg)
        from ..models import get_trainable_state

        initial = initial if initial is not None else get_trainable_state(self.model)
        _, total = count_parameters(self.model)
        super().__init__(cfg, with_client_dp(cfg, build_aggregator(cfg, initial)), run, initial,
                         full_model_bytes=4 * total, round_offset=round_offset, ledger=ledger)
        if strategy_state:
            self.load_strategy_state(strategy_state)

    def fit_config(self, server_round: int) -> dict:
        return {"proximal-mu": self.cfg.proximal_mu}

    def evaluate_global(self, arrays: list[np.ndarray]) -> dict[str, float]:
        task_data, raw, tokenized = self.test_sets()
        if len(raw) == 0:
            return {}
        set_trainable_state(self.model, arrays)
        return evaluate_model(self.model, self.tokenizer, raw, tokenized, task_data, self.cfg)

    def save_round(self, server_round: int, arrays: list[np.ndarray], final: bool) -> None:
        set_trainable_state(self.model, arrays)
        save_adapter(self.model, self.run.path / "final" if final
                     else self.run.round_dir(server_round))
