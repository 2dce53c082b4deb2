"""Client-level (user-level) DP for federated rounds: clip each client's update, average, noise.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"):
each sampled client's update (client state - global state) is clipped to L2 norm ``C``
(flat clipping), the clipped updates are summed and divided by ``m``, the number of clients
*sampled* for the round (McMahan et al.'s fixed-denominator estimator: a client that drops
out adds a zero update), and Gaussian noise of std ``z * C / m`` is added. Adding or removing
one client moves that mean by at most ``C / m`` whatever arrives, so sensitivity and noise
always match and the round is a subsampled Gaussian mechanism with noise multiplier ``z``
at sampling rate ``q = m / available`` (:func:`flower_num_sampled`); rounds with different
rates compose (:func:`client_level_epsilon_rates`).

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"): ``C`` follows a target quantile of the update norms by a geometric step on a
noised count of unclipped updates; the noise is split between the update and the count.

Conventions follow Flower's DP wrappers (``flwr/server/strategy/dp_fixed_clipping.py``,
``dp_adaptive_clipping.py``, ``flwr/client/mod/centraldp_mods.py``) except where a docstring
says otherwise. Pure numpy on lists of float arrays; no Flower import.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

Arrays = list[np.ndarray]


def _check(key: str, value: float, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is invalid: {allowed}")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def update_norm(arrays: Sequence[np.ndarray]) -> float:
    """L2 norm of all arrays flattened together (float64 accumulation)."""
    return float(math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))


def clip_update(arrays: Sequence[np.ndarray], clip_norm: float) -> tuple[Arrays, bool]:
    """Scale the update to L2 norm <= ``clip_norm`` (FlatClip); return (copy, was_clipped).

    ``was_clipped`` is True when the norm exceeded the bound, as Flower's
    ``adaptive_clip_inputs_inplace`` returns. Dtypes are kept; inputs are not modified.
    """
    _check("clip_norm", clip_norm, _finite(clip_norm) and clip_norm > 0, "must be > 0")
    norm = update_norm(arrays)
    if norm <= clip_norm:
        return [np.array(a, copy=True) for a in arrays], False
    scale = clip_norm / norm
    return [(np.asarray(a) * scale).astype(np.asarray(a).dtype) for a in arrays], True


def add_gaussian_noise(
    arrays: Sequence[np.ndarray], std: float, rng: np.random.Generator
) -> Arrays:
    """Return ``arrays + N(0, std^2)`` elementwise (noise drawn in float64, cast back)."""
    _check("std", std, _finite(std) and std >= 0, "must be >= 0")
    out = []
    for a in arrays:
        a = np.asarray(a)
        noisy = a + rng.normal(0.0, std, size=a.shape) if std > 0 else a.copy()
        out.append(np.asarray(noisy).astype(a.dtype))
    return out


def noise_std(noise_multiplier: float, clip_norm: float, num_sampled: int) -> float:
    """Std of the noise on the averaged update: ``z * C / m`` (Flower's ``compute_stdv``)."""
    return float(noise_multiplier * clip_norm / num_sampled)


def _check_round(updates: Sequence[Sequence[np.ndarray]], num_sampled: int | None) -> int:
    if not updates:
        raise ValueError("updates is empty: nothing to aggregate")
    shapes = [tuple(np.shape(a) for a in u) for u in updates]
    if any(s != shapes[0] for s in shapes):
        raise ValueError("updates must all have the same number and shapes of arrays")
    m = len(updates) if num_sampled is None else num_sampled
    _check("num_sampled", m, isinstance(m, int) and m >= len(updates),
           f"must be an integer >= the number of updates ({len(updates)})")
    if m != len(updates):
        # the mean divides by m too (dropped clients count as zero updates), so the
        # sensitivity C / m and the noise z * C / m still match
        logger.info("%d of %d sampled clients sent an update; the missing ones count as zero "
                    "updates in the DP mean", len(updates), m)
    return m


def _check_weights(weights: Sequence[float] | None, n: int) -> None:
    if weights is None:
        return
    if len(weights) != n:
        raise ValueError(f"weights has {len(weights)} entries for {n} updates")
    if len(set(float(w) for w in weights)) > 1:
        logger.warning(
            "client-level DP averages clipped updates uniformly; the unequal weights %s are "
            "ignored (a weighted mean would let one client move it by more than C/m)",
            list(weights),
        )


def _mean(updates: Sequence[Sequence[np.ndarray]], m: int) -> Arrays:
    """Sum of the updates divided by ``m`` (the sampled count, >= the number of updates)."""
    return [
        (sum(np.asarray(u[i], dtype=np.float64) for u in updates) / m).astype(
            np.asarray(updates[0][i]).dtype
        )
        for i in range(len(updates[0]))
    ]


def server_side_fixed(
    updates: Sequence[Sequence[np.ndarray]],
    weights: Sequence[float] | None,
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
    num_sampled: int | None = None,
) -> Arrays:
    """DP-FedAvg round with server-side fixed clipping; returns the noised mean update.

    Clip each update to ``clip_norm``, sum, divide by ``m`` = ``num_sampled`` (the clients
    sampled for the round, default: number of updates; missing ones count as zero updates)
    and add N(0, (z * C / m)^2), as Flower's ``DifferentialPrivacyServerSideFixedClipping``
    except that Flower divides by the updates received while noising for ``m``. Unlike that
    wrapper, which hands clipped
    updates to the inner strategy (FedAvg weights them by example counts), the mean here is
    unweighted: that is what bounds one client's influence by ``C / m`` (McMahan et al. 2018
    with all weights 1). ``weights`` is accepted for the FedAvg-like signature and ignored,
    with a warning if unequal.
    """
    _check(
        "noise_multiplier", noise_multiplier,
        _finite(noise_multiplier) and noise_multiplier >= 0, "must be >= 0",
    )
    m = _check_round(updates, num_sampled)
    _check_weights(weights, len(updates))
    clipped = [clip_update(u, clip_norm)[0] for u in updates]
    return add_gaussian_noise(_mean(clipped, m), noise_std(noise_multiplier, clip_norm, m), rng)


def client_side_clip(arrays: Sequence[np.ndarray], clip_norm: float) -> tuple[Arrays, bool]:
    """Client half of client-side clipping (Flower's ``fixedclipping_mod`` /
    ``adaptiveclipping_mod``): clip the update before it leaves the client. Same as
    :func:`clip_update`; ``was_clipped`` feeds :meth:`AdaptiveClipState.update`."""
    return clip_update(arrays, clip_norm)


def aggregate_client_clipped(
    updates: Sequence[Sequence[np.ndarray]],
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
    num_sampled: int | None = None,
    weights: Sequence[float] | None = None,
    rtol: float = 1e-4,
) -> Arrays:
    """Server half of client-side clipping: uniform mean of already-clipped updates + noise.

    The noise is that of :func:`server_side_fixed`. An update with norm above
    ``clip_norm * (1 + rtol)`` raises ValueError (the client did not clip, so the noise
    would not cover it); Flower's ``DifferentialPrivacyClientSideFixedClipping`` trusts the
    clients. Under secure aggregation the server only sees the sum: noise it with
    :func:`add_gaussian_noise` and :func:`noise_std` instead.
    """
    _check("clip_norm", clip_norm, _finite(clip_norm) and clip_norm > 0, "must be > 0")
    _check(
        "noise_multiplier", noise_multiplier,
        _finite(noise_multiplier) and noise_multiplier >= 0, "must be >= 0",
    )
    m = _check_round(updates, num_sampled)
    _check_weights(weights, len(updates))
    for i, u in enumerate(updates):
        norm = update_norm(u)
        if norm > clip_norm * (1 + rtol):
            raise ValueError(
                f"update {i} has norm {norm:.6g} > clip_norm={clip_norm}: the client did not "
                "clip (client-side clipping needs client_side_clip on every client)"
            )
    return add_gaussian_noise(_mean(updates, m), noise_std(noise_multiplier, clip_norm, m), rng)


def default_clipped_count_stddev(noise_multiplier: float, num_sampled: int) -> float:
    """``max(m / 20, z)``: Andrew et al.'s ``sigma_b = m / 20``, raised to ``z`` so that
    adaptive clipping works with few clients (``z < 2 sigma_b`` holds for any ``m``)."""
    return float(max(num_sampled / 20, noise_multiplier))


def adaptive_noise_params(
    noise_multiplier: float, num_sampled: int, clipped_count_stddev: float | None = None
) -> tuple[float, float]:
    """Split the noise of adaptive clipping; returns ``(clipped_count_stddev, update_noise)``.

    Andrew et al. 2021 (Thm. 1): releasing the noised update (multiplier ``z_delta``) and the
    noised count (std ``sigma_b``) costs as much as one Gaussian with
    ``z = (z_delta^-2 + (2 sigma_b)^-2)^-1/2``, so for a target ``z`` the update gets
    ``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2``. ``sigma_b`` defaults to ``max(m / 20, z)``:
    Andrew et al.'s ``m / 20`` (Flower's ``compute_adaptive_noise_params``) needs ``m > 10 z``
    clients per round, while ``sigma_b >= z`` always works and keeps ``z_delta <= 1.155 z``.
    With ``z == 0`` both are 0 (unless ``clipped_count_stddev`` is given); an explicit
    ``clipped_count_stddev <= z / 2`` is impossible and raises.
    """
    _check(
        "noise_multiplier", noise_multiplier,
        _finite(noise_multiplier) and noise_multiplier >= 0, "must be >= 0",
    )
    _check("num_sampled", num_sampled, num_sampled >= 1, "must be >= 1")
    if clipped_count_stddev is not None:
        _check(
            "clipped_count_stddev", clipped_count_stddev,
            _finite(clipped_count_stddev) and clipped_count_stddev >= 0, "must be >= 0",
        )
    if noise_multiplier == 0:
        return (0.0 if clipped_count_stddev is None else float(clipped_count_stddev)), 0.0
    sigma_b = (default_clipped_count_stddev(noise_multiplier, num_sampled)
               if clipped_count_stddev is None else float(clipped_count_stddev))
    if noise_multiplier >= 2 * sigma_b:
        raise ValueError(
            f"noise_multiplier={noise_multiplier} needs clipped_count_stddev > "
            f"noise_multiplier / 2 = {noise_multiplier / 2}, got {sigma_b}; raise "
            "clipped_count_stddev (None picks max(num_sampled / 20, noise_multiplier))"
        )
    update_noise = (noise_multiplier**-2 - (2 * sigma_b) ** -2) ** -0.5
    if update_noise / noise_multiplier >= 2:
        logger.warning(
            "adaptive clipping needs %.3gx the requested noise on the update; raise "
            "clipped_count_stddev or the number of sampled clients",
            update_noise / noise_multiplier,
        )
    return sigma_b, float(update_noise)


@dataclass
class AdaptiveClipState:
    """Clip norm that tracks a quantile of client update norms (Andrew et al. 2021, Alg. 1).

    After each round, with ``b`` = noised fraction of updates with norm <= C::

        C <- C * exp(-clip_lr * (b - target_quantile))

    so if nearly all updates fit under C (b > quantile) C shrinks, and if most are clipped it
    grows. Flower's old ``DPFedAvgAdaptive`` uses the same sign; its newer wrappers count
    *clipped* updates in that formula, which moves C the other way. Plain data: store
    ``dataclasses.asdict(state)`` in the server checkpoint.
    """

    clip_norm: float
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    clipped_count_stddev: float = 0.0

    def __post_init__(self) -> None:
        _check("clip_norm", self.clip_norm, _finite(self.clip_norm) and self.clip_norm > 0,
               "must be > 0")
        _check("target_quantile", self.target_quantile,
               _finite(self.target_quantile) and 0 <= self.target_quantile <= 1,
               "must be in [0, 1]")
        _check("clip_lr", self.clip_lr, _finite(self.clip_lr) and self.clip_lr > 0,
               "must be > 0")
        _check("clipped_count_stddev", self.clipped_count_stddev,
               _finite(self.clipped_count_stddev) and self.clipped_count_stddev >= 0,
               "must be >= 0")

    @classmethod
    def for_round(
        cls,
        noise_multiplier: float,
        num_sampled: int,
        clip_norm: float = 0.1,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        clipped_count_stddev: float | None = None,
    ) -> AdaptiveClipState:
        """State with Flower's initial C 0.1 and ``sigma_b`` from :func:`adaptive_noise_params`
        (default ``max(m / 20, z)`` when noised)."""
        sigma_b, _ = adaptive_noise_params(noise_multiplier, num_sampled, clipped_count_stddev)
        return cls(clip_norm, target_quantile, clip_lr, sigma_b)

    def update_noise_multiplier(self, noise_multiplier: float) -> float:
        """Noise multiplier for the update so the round's total is ``noise_multiplier``."""
        if noise_multiplier == 0:
            return 0.0
        return adaptive_noise_params(noise_multiplier, 1, self.clipped_count_stddev)[1]

    def update(
        self,
        was_clipped: Sequence[bool],
        rng: np.random.Generator,
        num_sampled: int | None = None,
    ) -> float:
        """Geometric step from this round's clip bits; returns (and stores) the new C.

        ``b = (#unclipped + N(0, clipped_count_stddev^2)) / m`` with ``m = num_sampled``
        (default ``len(was_clipped)``), as in Andrew et al.; Flower divides by the number of
        results.
        """
        if len(was_clipped) == 0:
            raise ValueError("was_clipped is empty: no updates this round")
        m = len(was_clipped) if num_sampled is None else num_sampled
        _check("num_sampled", m, m >= 1, "must be >= 1")
        unclipped = sum(1 for c in was_clipped if not c)
        noised = unclipped + (
            float(rng.normal(0.0, self.clipped_count_stddev)) if self.clipped_count_stddev else 0.0
        )
        self.clip_norm *= math.exp(-self.clip_lr * (noised / m - self.target_quantile))
        return self.clip_norm


def server_side_adaptive(
    updates: Sequence[Sequence[np.ndarray]],
    state: AdaptiveClipState,
    noise_multiplier: float,
    rng: np.random.Generator,
    num_sampled: int | None = None,
) -> Arrays:
    """DP-FedAvg round with server-side adaptive clipping; updates ``state`` in place.

    Clip each update with the current ``state.clip_norm``, average uniformly, add noise of
    std ``z_delta * C / m`` with ``z_delta = state.update_noise_multiplier(noise_multiplier)``
    and the C the updates were clipped with (Flower's wrappers use the already-updated C,
    which mis-scales the noise by up to ``exp(clip_lr / 2)``), then take the clip step.
    ``noise_multiplier`` is the total ``z`` used for accounting (:func:`client_level_epsilon`).
    """
    m = _check_round(updates, num_sampled)
    clip_norm = state.clip_norm
    results = [clip_update(u, clip_norm) for u in updates]
    z_delta = state.update_noise_multiplier(noise_multiplier)
    aggregate = add_gaussian_noise(
        _mean([r[0] for r in results], m), noise_std(z_delta, clip_norm, m), rng
    )
    state.update([r[1] for r in results], rng, num_sampled=m)
    return aggregate


def flower_num_sampled(fraction_fit: float, min_fit_clients: int, available: int) -> int:
    """Clients Flower's ``FedAvg.configure_fit`` samples: ``max(int(fraction * available),
    min_fit_clients)`` (``num_fit_clients``), so the real per-round sampling rate is this
    over ``available``, not ``fraction_fit``."""
    _check("fraction_fit", fraction_fit, _finite(fraction_fit) and 0 < fraction_fit <= 1,
           "must be in (0, 1]")
    _check("min_fit_clients", min_fit_clients, min_fit_clients >= 1, "must be >= 1")
    _check("available", available, available >= 0, "must be >= 0")
    return max(int(fraction_fit * available), min_fit_clients)


def client_level_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Client-level epsilon after ``rounds`` rounds at one sampling rate, via Opacus.

    Same as :func:`client_level_epsilon_rates` with ``[sampling_rate] * rounds``.
    """
    _check("rounds", rounds, isinstance(rounds, int) and rounds >= 0, "must be an int >= 0")
    _check("sampling_rate", sampling_rate, 0 < sampling_rate <= 1, "must be in (0, 1]")
    return client_level_epsilon_rates(noise_multiplier, [sampling_rate] * rounds, delta,
                                      accountant)


def client_level_epsilon_rates(
    noise_multiplier: float,
    sampling_rates: Sequence[float],
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Client-level epsilon of DP-FedAvg rounds with these per-round sampling rates.

    Round ``r`` samples ``q_r = m_r / N_r`` of the available clients (``0``: the round
    trained nobody and costs nothing); the rounds compose as subsampled Gaussian mechanisms
    with noise multiplier ``z`` in Opacus' RDP or PRV accountant. The accountant assumes
    Poisson sampling of clients (as McMahan et al. 2018); Flower samples exactly ``m_r``
    clients, for which this is the usual approximation.
    """
    _check(
        "noise_multiplier", noise_multiplier,
        _finite(noise_multiplier) and noise_multiplier >= 0, "must be >= 0",
    )
    for q in sampling_rates:
        _check("sampling_rate", q, _finite(q) and 0 <= q <= 1, "must be in [0, 1]")
    # imported here so the numpy helpers above do not pull in torch/opacus
    from fatellm_flwr.privacy.dp import epsilon_from_history

    history = [(noise_multiplier, float(q), 1) for q in sampling_rates]
    return epsilon_from_history(history, delta, accountant)
