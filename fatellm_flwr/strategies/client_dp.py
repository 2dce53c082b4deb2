"""Client-level DP (DP-FedAvg) as a thin wrapper around any aggregating strategy.

DP-FedAvg (McMahan et al. 2018): each client's update (its state minus the global state)
is clipped to L2 norm C, the updates are averaged *uniformly* and Gaussian noise of std
``z * C / m`` is added (``m`` = sampled clients). Clipping happens on the server
(``server-*``) or on the clients (``client-*``, Flower's ``fixedclipping_mod`` /
``adaptiveclipping_mod``; the only variant that combines with SecAgg+, whose aggregate then
already is the uniform mean of clipped updates). Adaptive clipping (Andrew et al. 2021)
moves C geometrically towards the target quantile of unclipped updates.

The arithmetic lives in :mod:`fatellm_flwr.privacy.client_dp`. Flower's own wrappers are
not used: in flwr 1.41 their adaptive variants feed the *clipped* fraction into Andrew et
al.'s update (C moves the wrong way), noise with the already-updated C, and average by
example count (one client can move the mean by more than C/m).
"""

from __future__ import annotations

import secrets

import numpy as np
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from ..config import Config
from ..privacy.client_dp import (
    AdaptiveClipState,
    add_gaussian_noise,
    aggregate_client_clipped,
    noise_std,
    server_side_adaptive,
    server_side_fixed,
)


class ClientLevelDP(Strategy):
    """Wraps ``strategy``: clip/average/noise the round's updates, then hand the noised
    global state to ``strategy`` as the single result (server optimizers still apply)."""

    def __init__(self, cfg: Config, strategy: Strategy):
        super().__init__()
        self.cfg = cfg
        self.strategy = strategy
        self.mode = cfg.client_dp
        self.noise_multiplier = cfg.client_dp_noise_multiplier
        self.adaptive = None
        self.fixed_norm = cfg.client_dp_clip_norm
        if self.mode.endswith("-adaptive"):
            self.adaptive = AdaptiveClipState.for_round(
                cfg.client_dp_noise_multiplier, cfg.min_fit_clients,
                clip_norm=cfg.client_dp_clip_norm, target_quantile=cfg.client_dp_target_quantile,
                clip_lr=cfg.client_dp_clip_lr)
        self._current: list[np.ndarray] = []
        self._rng = np.random.default_rng(secrets.randbits(128))  # unpredictable noise

    @property
    def clipping_norm(self) -> float:
        return self.adaptive.clip_norm if self.adaptive else self.fixed_norm

    @clipping_norm.setter
    def clipping_norm(self, value: float) -> None:
        if self.adaptive:
            self.adaptive.clip_norm = float(value)
        else:
            self.fixed_norm = float(value)

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self._current = parameters_to_ndarrays(parameters)
        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        if self.mode.startswith("client-"):
            for _, ins in instructions:
                ins.config[KEY_CLIPPING_NORM] = float(self.clipping_norm)
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results:
            return None, {}
        m = max(self.cfg.min_fit_clients, len(results))
        z = self.noise_multiplier
        updates = [[a - c for a, c in zip(parameters_to_ndarrays(r.parameters), self._current)]
                   for _, r in results]
        if self.mode == "server-fixed":
            update = server_side_fixed(updates, None, self.fixed_norm, z, self._rng, m)
        elif self.mode == "server-adaptive":
            update = server_side_adaptive(updates, self.adaptive, z, self._rng, m)
        else:
            clip = self.clipping_norm
            z_update = self.adaptive.update_noise_multiplier(z) if self.adaptive else z
            if self.cfg.secure_aggregation:  # SecAgg+ already summed: one uniform mean
                update = add_gaussian_noise(updates[0], noise_std(z_update, clip, m), self._rng)
            else:
                update = aggregate_client_clipped(updates, clip, z_update, self._rng, m)
            if self.adaptive:
                bits = [bool(r.metrics.get(KEY_NORM_BIT, False)) for _, r in results]
                self.adaptive.update(bits, self._rng, num_sampled=m)
        noised = ndarrays_to_parameters([c + u for c, u in zip(self._current, update)])
        single = [(results[0][0], FitRes(Status(Code.OK, ""), noised, 1, {}))]
        params, metrics = self.strategy.aggregate_fit(server_round, single, [])
        return params, {**metrics, "client_dp_clip_norm": float(self.clipping_norm)}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round, parameters):
        return self.strategy.evaluate(server_round, parameters)


def with_client_dp(cfg: Config, strategy: Strategy) -> Strategy:
    """``strategy`` wrapped with client-level DP when ``client-dp`` is set."""
    return strategy if cfg.client_dp == "none" else ClientLevelDP(cfg, strategy)
