"""Client-level DP (DP-FedAvg) as a thin wrapper around any aggregating strategy.

DP-FedAvg (McMahan et al. 2018): each client's update (its state minus the global state)
is clipped to L2 norm C, the clipped updates are summed and divided by ``m``, the number of
clients sampled this round (a client that fails counts as a zero update), and Gaussian noise
of std ``z * C / m`` is added: one count for the mean and the noise, so the sensitivity
``C / m`` and the noise match when clients drop. Each round's sampling rate ``m / available``
is recorded at ``configure_fit`` (:meth:`ClientLevelDP.sampling_rate`) for the accountant.
Clipping happens on the server
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
    adaptive_noise_params,
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
        # 0 = auto: max(m / 20, z), set each round from the sampled count m
        self.count_stddev = cfg.client_dp_clipped_count_stddev or None
        if self.mode.endswith("-adaptive"):
            self.adaptive = AdaptiveClipState.for_round(
                cfg.client_dp_noise_multiplier, cfg.min_fit_clients,
                clip_norm=cfg.client_dp_clip_norm, target_quantile=cfg.client_dp_target_quantile,
                clip_lr=cfg.client_dp_clip_lr, clipped_count_stddev=self.count_stddev)
        self._current: list[np.ndarray] = []
        # server_round -> (clients sampled, clients available) at configure_fit
        self.sampled: dict[int, tuple[int, int]] = {}
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

    def sampling_rate(self, server_round: int) -> float | None:
        """Fraction of the available clients sampled to train in ``server_round`` (Flower's
        ``max(int(fraction_fit * available), min_fit_clients) / available``, as the inner
        strategy really sampled); 0.0 for a round that sampled nobody, None when this
        process did not configure that round."""
        if server_round not in self.sampled:
            return None
        m, available = self.sampled[server_round]
        return m / available if available else 0.0

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self._current = parameters_to_ndarrays(parameters)
        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        # counted after sampling: Flower's sample() may have waited for more clients
        m = len(instructions)
        self.sampled[server_round] = (m, max(client_manager.num_available(), m))
        if self.mode.startswith("client-"):
            for _, ins in instructions:
                ins.config[KEY_CLIPPING_NORM] = float(self.clipping_norm)
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results:
            return None, {}
        # one count for the mean and the noise: the clients sampled for this round
        m = max(self.sampled.get(server_round, (0, 0))[0], len(results))
        z = self.noise_multiplier
        updates = [[a - c for a, c in zip(parameters_to_ndarrays(r.parameters), self._current)]
                   for _, r in results]
        if self.adaptive:
            self.adaptive.clipped_count_stddev, _ = adaptive_noise_params(z, m, self.count_stddev)
        if self.mode == "server-fixed":
            update = server_side_fixed(updates, None, self.fixed_norm, z, self._rng, m)
        elif self.mode == "server-adaptive":
            update = server_side_adaptive(updates, self.adaptive, z, self._rng, m)
        else:
            clip = self.clipping_norm
            z_update = self.adaptive.update_noise_multiplier(z) if self.adaptive else z
            if self.cfg.secure_aggregation:
                # SecAgg+ hands every surviving client the mean of their (weight-1) updates:
                # times their count is the sum, which is divided by m like the other modes
                mean_sum = [u * (len(results) / m) for u in updates[0]]
                update = add_gaussian_noise(mean_sum, noise_std(z_update, clip, m), self._rng)
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
