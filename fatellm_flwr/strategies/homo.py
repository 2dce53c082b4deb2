"""FedHomoLLM server: aggregate PEFT adapters (FATE-LLM's homo federated PEFT).

Weighted FedAvg (McMahan et al. 2017) over the trainable tensors, FedProx (Li et al.
2020; the proximal term lives on the clients, which read `proximal-mu` from the run config
every party shares: the server does not resend it), and adaptive server optimizers FedAdam /
FedYogi / FedAvgM (Reddi et al. 2021; Hsu et al. 2019) — Flower's own implementations,
wrapped by :class:`~fatellm_flwr.strategies.base.TrackedStrategy`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
from flwr.server.strategy import FedAdam, FedAvg, FedAvgM, FedYogi, Strategy

from ..config import Config
from ..models import count_parameters, load_peft_model, set_trainable_state
from ..outputs import PEFT_ADAPTER, save_model_folder
from .base import TrackedStrategy
from .client_dp import with_client_dp
from .evaluation import HeldOutSet, model_evaluator
from .flexlora import FlexLoRAFedAvg, count_own_rank_downloads, server_rank

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
        # FlexLoRA (clients at their own LoRA ranks): the global state at the largest rank
        self.model, self.tokenizer = load_peft_model(
            cfg.replace(lora_r=server_rank(cfg)) if cfg.flexlora else cfg)
        from ..models import get_trainable_state, trainable_names

        initial = initial if initial is not None else get_trainable_state(self.model)
        _, total = count_parameters(self.model)
        load = partial(set_trainable_state, self.model)
        evaluate_fn, validate_fn = (
            model_evaluator(self.model, self.tokenizer, cfg, load,
                            HeldOutSet(cfg, self.tokenizer, split))
            for split in ("test", "val"))
        inner = build_aggregator(cfg, initial)
        if cfg.flexlora:
            inner = FlexLoRAFedAvg(trainable_names(self.model), cfg.lora_alpha,
                                   server_rank(cfg), **_flexlora_kwargs(inner))
        super().__init__(cfg, with_client_dp(cfg, inner), run, initial,
                         full_model_bytes=4 * total, round_offset=round_offset, ledger=ledger,
                         evaluate_fn=evaluate_fn, validate_fn=validate_fn)
        if strategy_state:
            self.load_strategy_state(strategy_state)

    def check_result(self, arrays: list[np.ndarray]) -> str | None:
        if isinstance(self.aggregator, FlexLoRAFedAvg):  # any rank per LoRA pair
            return self.aggregator.problem(arrays, self.current)
        return super().check_result(arrays)

    def configure_fit(self, server_round, parameters, client_manager):
        instructions = super().configure_fit(server_round, parameters, client_manager)
        if isinstance(self.aggregator, FlexLoRAFedAvg):
            count_own_rank_downloads(self.ledger, self.absolute(server_round), parameters,
                                     instructions)
        return instructions

    def save_round(self, server_round: int, arrays: list[np.ndarray], folder: Path,
                   final: bool) -> None:
        set_trainable_state(self.model, arrays)
        save_model_folder(folder,
                          self.model, self.tokenizer, kind=PEFT_ADAPTER, algorithm="homo",
                          base_model=self.cfg.model, gguf_file=self.cfg.gguf_file,
                          server_round=server_round)


def _flexlora_kwargs(fedavg: FedAvg) -> dict:
    """The sampling settings of a Flower FedAvg, to build FlexLoRA's with the same."""
    return dict(fraction_fit=fedavg.fraction_fit, fraction_evaluate=fedavg.fraction_evaluate,
                min_fit_clients=fedavg.min_fit_clients,
                min_evaluate_clients=fedavg.min_evaluate_clients,
                min_available_clients=fedavg.min_available_clients,
                initial_parameters=fedavg.initial_parameters,
                fit_metrics_aggregation_fn=fedavg.fit_metrics_aggregation_fn,
                evaluate_metrics_aggregation_fn=fedavg.evaluate_metrics_aggregation_fn)
