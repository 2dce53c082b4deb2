"""Client-level DP core (fatellm_flwr.privacy.client_dp): clipping, noise, adaptive C, epsilon."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fatellm_flwr.privacy import client_dp as cdp


def _update(rng: np.random.Generator, scale: float) -> list[np.ndarray]:
    return [
        rng.normal(0, scale, (30, 7)).astype(np.float32),
        rng.normal(0, scale, (11,)).astype(np.float32),
    ]


def test_clip_update_bounds_large_and_keeps_small_updates():
    rng = np.random.default_rng(0)
    big, small = _update(rng, 1.0), _update(rng, 1e-3)
    big_copy = [a.copy() for a in big]
    clipped, was = cdp.clip_update(big, 0.5)
    assert was and cdp.update_norm(clipped) == pytest.approx(0.5, rel=1e-6)
    assert cdp.update_norm(big) > 5  # input untouched
    assert all(np.array_equal(a, b) for a, b in zip(big, big_copy))
    assert all(c.dtype == np.float32 for c in clipped)
    # direction kept
    cos = np.dot(np.concatenate([c.ravel() for c in clipped]), np.concatenate(
        [a.ravel() for a in big])) / (0.5 * cdp.update_norm(big))
    assert cos == pytest.approx(1.0, abs=1e-5)

    same, was = cdp.clip_update(small, 0.5)
    assert not was and all(np.array_equal(a, b) for a, b in zip(same, small))
    zero, was = cdp.clip_update([np.zeros(3)], 0.5)  # flwr divides by the zero norm here
    assert not was and not zero[0].any()
    with pytest.raises(ValueError, match=r"clip_norm=0 is invalid"):
        cdp.clip_update(small, 0)


def test_server_side_fixed_mean_and_noise_std():
    rng = np.random.default_rng(1)
    updates = [_update(rng, s) for s in (1.0, 2.0, 1e-3, 5.0)]
    clip = 0.7
    expected = [
        np.mean([cdp.clip_update(u, clip)[0][i] for u in updates], axis=0) for i in range(2)
    ]
    out = cdp.server_side_fixed(updates, None, clip, 0.0, rng)
    for got, want in zip(out, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    assert cdp.update_norm(out) <= clip

    # noise: zero updates, z * C / m per coordinate (Flower's compute_stdv)
    zeros = [[np.zeros(40_000, dtype=np.float32)] for _ in range(4)]
    noisy = cdp.server_side_fixed(zeros, [1, 1, 1, 1], 2.0, 1.5, rng)[0]
    assert cdp.noise_std(1.5, 2.0, 4) == 0.75
    assert noisy.std() == pytest.approx(0.75, rel=0.02)
    assert abs(noisy.mean()) < 0.01
    # fewer results than sampled: noise stays calibrated to num_sampled
    noisy = cdp.server_side_fixed(zeros[:3], None, 2.0, 1.5, rng, num_sampled=6)[0]
    assert noisy.std() == pytest.approx(0.5, rel=0.02)
    with pytest.raises(ValueError, match=r"num_sampled=2 is invalid"):
        cdp.server_side_fixed(zeros[:3], None, 2.0, 1.5, rng, num_sampled=2)


@pytest.mark.parametrize("mode", ["server-fixed", "client-clipped", "server-adaptive"])
def test_dropped_clients_mean_and_noise_use_the_sampled_count(mode):
    """3 of 6 sampled clients reply: the mean is the sum of clipped updates / 6 (the missing
    ones count as zero updates) and the noise z * C / 6, so the sensitivity C / 6 and the
    noise match; dividing by the 3 received would double the sensitivity."""
    rng = np.random.default_rng(11)
    clip = 0.5
    updates = [_update(rng, s) for s in (1.0, 1e-3, 3.0)]
    if mode == "client-clipped":
        updates = [cdp.client_side_clip(u, clip)[0] for u in updates]
    clipped = [cdp.clip_update(u, clip)[0] for u in updates]
    want = [sum(u[i].astype(np.float64) for u in clipped) / 6 for i in range(2)]

    if mode == "server-fixed":
        out = cdp.server_side_fixed(updates, None, clip, 0.0, rng, num_sampled=6)
    elif mode == "client-clipped":
        out = cdp.aggregate_client_clipped(updates, clip, 0.0, rng, num_sampled=6)
    else:
        state = cdp.AdaptiveClipState(clip_norm=clip)
        out = cdp.server_side_adaptive(updates, state, 0.0, rng, num_sampled=6)
    for got, w in zip(out, want):
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-9)
    # one client more or less moves the result by at most C / 6
    more = cdp.server_side_fixed([*updates, _update(rng, 9.0)], None, clip, 0.0, rng,
                                 num_sampled=6)
    assert cdp.update_norm([a - b for a, b in zip(more, out)]) <= clip / 6 * (1 + 1e-6)


def test_unequal_weights_are_ignored_with_warning(caplog):
    rng = np.random.default_rng(2)
    updates = [[np.full(4, 1.0)], [np.full(4, 3.0)]]
    with caplog.at_level(logging.WARNING, logger="fatellm_flwr.privacy.client_dp"):
        out = cdp.server_side_fixed(updates, [1.0, 9.0], 100.0, 0.0, rng)
    np.testing.assert_allclose(out[0], np.full(4, 2.0))  # uniform, not 2.8 (weighted)
    assert "ignored" in caplog.text


def test_client_side_clipping_then_server_noise():
    rng = np.random.default_rng(3)
    raw = [_update(rng, 1.0) for _ in range(5)]
    sent = [cdp.client_side_clip(u, 0.3)[0] for u in raw]
    agg = cdp.aggregate_client_clipped(sent, 0.3, 0.0, rng)
    want = cdp.server_side_fixed(raw, None, 0.3, 0.0, rng)
    for a, b in zip(agg, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match=r"update 2 has norm .* > clip_norm=0.3"):
        cdp.aggregate_client_clipped([*sent[:2], raw[2]], 0.3, 1.0, rng)
    zeros = [[np.zeros(40_000)] for _ in range(5)]
    noisy = cdp.aggregate_client_clipped(zeros, 0.3, 2.0, rng)[0]
    assert noisy.std() == pytest.approx(2.0 * 0.3 / 5, rel=0.02)


def test_adaptive_clip_norm_moves_toward_the_quantile():
    rng = np.random.default_rng(4)
    state = cdp.AdaptiveClipState(clip_norm=1.0, target_quantile=0.5, clip_lr=0.2)
    small = [_update(rng, 1e-3) for _ in range(4)]
    large = [_update(rng, 10.0) for _ in range(4)]

    cdp.server_side_adaptive(small, state, 0.0, rng)  # all unclipped: C shrinks
    assert state.clip_norm == pytest.approx(math.exp(-0.2 * (1.0 - 0.5)))
    state = cdp.AdaptiveClipState(clip_norm=1.0)
    cdp.server_side_adaptive(large, state, 0.0, rng)  # all clipped: C grows
    assert state.clip_norm == pytest.approx(math.exp(-0.2 * (0.0 - 0.5)))

    # mixed, by hand: 3 of 4 unclipped, quantile 0.8 -> C * exp(-lr * (0.75 - 0.8))
    state = cdp.AdaptiveClipState(clip_norm=2.0, target_quantile=0.8, clip_lr=0.5)
    bits = [cdp.clip_update(u, 2.0)[1] for u in [*small[:3], large[0]]]
    assert bits == [False, False, False, True]
    assert state.update(bits, rng) == pytest.approx(2.0 * math.exp(-0.5 * (0.75 - 0.8)))

    # repeated rounds converge near the median norm of the updates
    norms = np.linspace(0.5, 1.5, 11)
    updates = [[np.array([n])] for n in norms]
    state = cdp.AdaptiveClipState(clip_norm=0.05, clip_lr=0.2)
    for _ in range(200):
        cdp.server_side_adaptive(updates, state, 0.0, rng)
    assert 0.8 < state.clip_norm < 1.2
    assert dataclasses.asdict(state)["clip_norm"] == state.clip_norm


def test_adaptive_noise_split_and_update_noise_std():
    # Andrew et al.: z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2, sigma_b default max(m / 20, z)
    sigma_b, z_delta = cdp.adaptive_noise_params(1.0, 100)
    assert sigma_b == 5.0 and z_delta == pytest.approx((1.0 - 1 / 100) ** -0.5)
    assert cdp.adaptive_noise_params(0.0, 100) == (0.0, 0.0)
    # few clients (m / 20 would be 0.1 .. 0.5 <= z / 2 and fail): sigma_b = z, z_delta 1.155 z
    for m in (2, 3, 5, 10):
        sigma_b, z_delta = cdp.adaptive_noise_params(1.0, m)
        assert sigma_b == 1.0 and z_delta == pytest.approx((1.0 - 1 / 4) ** -0.5)
        assert (z_delta**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"noise_multiplier=1.0 needs clipped_count_stddev"):
        cdp.adaptive_noise_params(1.0, 10, clipped_count_stddev=0.5)  # 0.5 <= z / 2

    rng = np.random.default_rng(5)
    state = cdp.AdaptiveClipState.for_round(noise_multiplier=1.0, num_sampled=4,
                                            clip_norm=2.0, clipped_count_stddev=2.0)
    z_delta = state.update_noise_multiplier(1.0)
    assert z_delta == pytest.approx((1.0 - 1 / 16) ** -0.5)
    zeros = [[np.zeros(40_000)] for _ in range(4)]
    noisy = cdp.server_side_adaptive(zeros, state, 1.0, rng)[0]
    # noise uses the C the updates were clipped with (2.0), not the updated one
    assert noisy.std() == pytest.approx(z_delta * 2.0 / 4, rel=0.02)
    assert state.clip_norm != 2.0


def test_flower_num_sampled_is_what_flowers_fedavg_samples():
    from flwr.server.strategy import FedAvg

    for fraction, min_fit, available in [(1.0, 2, 3), (0.5, 2, 3), (0.1, 2, 5), (0.3, 1, 10),
                                         (0.25, 3, 40), (0.99, 2, 7)]:
        want, _ = FedAvg(fraction_fit=fraction, min_fit_clients=min_fit).num_fit_clients(
            available)
        assert cdp.flower_num_sampled(fraction, min_fit, available) == want
    # the rate is not fraction-fit: 0.5 of 3 available samples 2 clients, q = 2/3
    assert cdp.flower_num_sampled(0.5, 2, 3) / 3 == pytest.approx(2 / 3)


def test_client_level_epsilon_composes_per_round_rates_like_opacus():
    """Rounds at different sampling rates (available clients changed) compose: stepping
    Opacus' accountants round by round, and summing Mironov's RDP by hand, agree."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    rates = [2 / 3, 2 / 3, 0.4, 0.0, 1.0, 0.4]  # 0.0: a round that sampled nobody
    for name, cls, qs in (("rdp", RDPAccountant, rates), ("prv", PRVAccountant, [0.5, 0, 0.25])):
        acc = cls()
        for q in qs:
            if q > 0:
                acc.step(noise_multiplier=1.3, sample_rate=q)
        got = cdp.client_level_epsilon_rates(1.3, qs, 1e-5, accountant=name)
        assert got == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-6), name
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(compute_rdp(q=q, noise_multiplier=1.3, steps=1, orders=orders)
              for q in rates if q > 0)
    by_hand, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert cdp.client_level_epsilon_rates(1.3, rates, 1e-5) == pytest.approx(by_hand, rel=1e-9)
    # one rate repeated = client_level_epsilon; rates above fraction-fit cost more
    assert cdp.client_level_epsilon_rates(1.3, [0.5] * 4, 1e-5) == pytest.approx(
        cdp.client_level_epsilon(1.3, 0.5, 4, 1e-5))
    assert cdp.client_level_epsilon(1.3, 2 / 3, 4, 1e-5) > cdp.client_level_epsilon(
        1.3, 0.5, 4, 1e-5)
    assert cdp.client_level_epsilon_rates(1.3, [0.0, 0.0], 1e-5) == 0.0
    with pytest.raises(ValueError, match=r"sampling_rate=1.2 is invalid"):
        cdp.client_level_epsilon_rates(1.3, [0.5, 1.2], 1e-5)


def test_client_level_epsilon_matches_opacus_accountants():
    for name, cls in (("rdp", RDPAccountant), ("prv", PRVAccountant)):
        acc = cls()
        for _ in range(30):
            acc.step(noise_multiplier=1.2, sample_rate=0.1)
        got = cdp.client_level_epsilon(1.2, 0.1, 30, 1e-5, accountant=name)
        assert got == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-6), name
    assert cdp.client_level_epsilon(1.2, 0.1, 0, 1e-5) == 0.0
    assert cdp.client_level_epsilon(0.0, 0.1, 3, 1e-5) == math.inf
    with pytest.raises(ValueError, match=r"sampling_rate=1.5 is invalid"):
        cdp.client_level_epsilon(1.0, 1.5, 3, 1e-5)
    with pytest.raises(ValueError, match=r"delta=2 is invalid"):
        cdp.client_level_epsilon(1.0, 0.5, 3, 2)
