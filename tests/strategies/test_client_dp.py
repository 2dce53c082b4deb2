"""ClientLevelDP: DP-FedAvg clipping/noise around a Flower aggregator, against numpy."""

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT
from opacus.accountants import RDPAccountant

from fatellm_flwr.config import Config, ConfigError
from fatellm_flwr.outputs import RunDir
from fatellm_flwr.privacy.client_dp import client_level_epsilon
from fatellm_flwr.strategies.base import TrackedStrategy
from fatellm_flwr.strategies.client_dp import ClientLevelDP
from fatellm_flwr.strategies.homo import build_aggregator
from fatellm_flwr.testing import FakeClientManager as Manager
from fatellm_flwr.testing import FakeProxy as Proxy


def _res(arrays, n=7, **metrics):
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, metrics)


def _setup(mode, **kw):
    cfg = Config.from_run_config({"client-dp": mode, "min-fit-clients": 3,
                                  "min-available-clients": 3, **kw})
    current = [np.zeros(4, np.float32)]
    dp = ClientLevelDP(cfg, build_aggregator(cfg, current))
    ins = dp.configure_fit(1, ndarrays_to_parameters(current), Manager(3))
    return dp, ins


def test_server_fixed_is_the_uniform_mean_of_clipped_updates():
    dp, ins = _setup("server-fixed", **{"client-dp-clip-norm": 1.0,
                                        "client-dp-noise-multiplier": 0.0})
    assert all(KEY_CLIPPING_NORM not in i.config for _, i in ins)  # server clips
    ups = [np.array([3.0, 4.0, 0, 0], np.float32), np.array([0.1, 0, 0, 0], np.float32),
           np.array([0, 0, 0, 0.5], np.float32)]
    params, _ = dp.aggregate_fit(1, [(Proxy(str(i)), _res([u], n=10 ** i))
                                     for i, u in enumerate(ups)], [])
    ref = (ups[0] / 5.0 + ups[1] + ups[2]) / 3  # clipped to norm 1, example counts ignored
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], ref, rtol=1e-6)


def test_noise_std_is_z_c_over_m():
    dp, _ = _setup("server-fixed", **{"client-dp-clip-norm": 2.0,
                                      "client-dp-noise-multiplier": 1.5})
    zero = np.zeros(20000, np.float32)
    dp._current = [zero]
    params, _ = dp.aggregate_fit(1, [(Proxy(str(i)), _res([zero])) for i in range(3)], [])
    assert np.std(parameters_to_ndarrays(params)[0]) == pytest.approx(1.5 * 2.0 / 3, rel=0.03)


@pytest.mark.parametrize("mode", ["server-adaptive", "client-adaptive"])
def test_adaptive_clip_norm_moves_towards_the_updates(mode):
    dp, ins = _setup(mode, **{"client-dp-clip-norm": 10.0, "client-dp-noise-multiplier": 0.0})
    if mode == "client-adaptive":
        assert all(i.config[KEY_CLIPPING_NORM] == 10.0 for _, i in ins)
    small = [np.full(4, 0.01, np.float32)]
    for rnd in (1, 2):
        before = dp.clipping_norm
        results = [(Proxy(str(i)), _res(small, **{KEY_NORM_BIT: False})) for i in range(3)]
        dp.aggregate_fit(rnd, results, [])
        assert dp.clipping_norm < before  # all unclipped -> C shrinks
    before = dp.clipping_norm
    # clipped to the current norm (as the client mod does when the server doesn't clip)
    big = [np.full(4, 1e3 if mode == "server-adaptive" else before / 2, np.float32)]
    dp.aggregate_fit(3, [(Proxy(str(i)), _res(big, **{KEY_NORM_BIT: True}))
                         for i in range(3)], [])
    assert dp.clipping_norm > before  # all clipped -> C grows
    assert dp.clipping_norm == pytest.approx(before * np.exp(0.2 * 0.5))


def test_sampling_rate_is_the_rate_flower_really_samples_at():
    # fraction-fit 0.5 of 3 available: Flower samples max(int(1.5), 2) = 2 -> q = 2/3, not 0.5
    cfg = Config.from_run_config({"client-dp": "server-fixed", "fraction-fit": 0.5,
                                  "min-fit-clients": 2, "min-available-clients": 2})
    dp = ClientLevelDP(cfg, build_aggregator(cfg, [np.zeros(4, np.float32)]))
    params = ndarrays_to_parameters([np.zeros(4, np.float32)])
    assert len(dp.configure_fit(1, params, Manager(3))) == 2
    assert dp.sampling_rate(1) == pytest.approx(2 / 3)
    assert len(dp.configure_fit(2, params, Manager(10))) == 5  # more clients joined
    assert dp.sampling_rate(2) == pytest.approx(0.5)
    assert dp.sampling_rate(3) is None  # not configured (yet)


def test_dropped_client_mean_and_noise_share_the_sampled_count():
    """3 sampled, 1 fails: the mean divides the clipped sum by 3 and the noise is z*C/3
    (before: noise for 3, mean over the 2 received, so one client moved it by C/2)."""
    dp, ins = _setup("server-fixed", **{"client-dp-clip-norm": 1.0,
                                        "client-dp-noise-multiplier": 0.0})
    assert len(ins) == 3
    ups = [np.array([0.3, 0, 0, 0], np.float32), np.array([0, 6.0, 8.0, 0], np.float32)]
    params, _ = dp.aggregate_fit(1, [(Proxy(str(i)), _res([u])) for i, u in enumerate(ups)],
                                 [RuntimeError("client 2 failed")])
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0],
                               (ups[0] + ups[1] / 10) / 3, rtol=1e-6)
    dp, _ = _setup("server-fixed", **{"client-dp-clip-norm": 2.0,
                                      "client-dp-noise-multiplier": 1.5})
    zero = np.zeros(20000, np.float32)
    dp._current = [zero]
    params, _ = dp.aggregate_fit(1, [(Proxy(str(i)), _res([zero])) for i in range(2)], [])
    assert np.std(parameters_to_ndarrays(params)[0]) == pytest.approx(1.5 * 2.0 / 3, rel=0.03)


def test_secagg_mean_of_survivors_is_rescaled_to_the_sampled_count():
    """Under SecAgg+ every survivor's result holds the mean of the survivors' clipped
    updates; with 2 of 3 sampled surviving, the DP mean is that mean x 2/3 (= sum / 3)."""
    dp, _ = _setup("client-fixed", **{"client-dp-clip-norm": 1.0, "secure-aggregation": True,
                                      "client-dp-noise-multiplier": 0.0})
    mean = [np.array([0.2, -0.1, 0.0, 0.4], np.float32)]
    params, _ = dp.aggregate_fit(1, [(Proxy(str(i)), _res(mean, n=1)) for i in range(2)], [])
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], mean[0] * 2 / 3, rtol=1e-6)


@pytest.mark.parametrize("mode", ["server-adaptive", "client-adaptive"])
@pytest.mark.parametrize("clients", [2, 3, 5])
def test_adaptive_clipping_starts_with_default_noise_and_few_clients(mode, clients):
    """Default client-dp-noise-multiplier (1.0) with 2-5 clients: starts (it raised unless
    11+ clients trained), and the update noise is z_delta * C / m with
    sigma_b = max(m / 20, z) = 1, z_delta = (1 - 1/4)^-1/2."""
    cfg = Config.from_run_config({"client-dp": mode, "min-fit-clients": clients,
                                  "min-available-clients": clients,
                                  "client-dp-clip-norm": 2.0})
    zero = np.zeros(20000, np.float32)
    dp = ClientLevelDP(cfg, build_aggregator(cfg, [zero]))
    dp.configure_fit(1, ndarrays_to_parameters([zero]), Manager(clients))
    params, _ = dp.aggregate_fit(1, [(Proxy(str(i)), _res([zero], **{KEY_NORM_BIT: False}))
                                     for i in range(clients)], [])
    z_delta = (1.0 - 1 / 4) ** -0.5
    assert dp.adaptive.clipped_count_stddev == 1.0
    assert np.std(parameters_to_ndarrays(params)[0]) == pytest.approx(
        z_delta * 2.0 / clients, rel=0.03)


def test_explicit_clipped_count_stddev_is_used_and_checked_at_start_up():
    cfg = Config.from_run_config({"client-dp": "server-adaptive", "min-fit-clients": 2,
                                  "client-dp-noise-multiplier": 1.0,
                                  "client-dp-clipped-count-stddev": 2.0})
    dp = ClientLevelDP(cfg, build_aggregator(cfg, [np.zeros(4, np.float32)]))
    assert dp.adaptive.clipped_count_stddev == 2.0
    with pytest.raises(ConfigError, match=r"client-dp-clipped-count-stddev=0.5 is too small "
                                          r"for client-dp-noise-multiplier=1.0.*> "
                                          r"client-dp-noise-multiplier / 2 = 0.5"):
        Config.from_run_config({"client-dp": "client-adaptive",
                                "client-dp-clipped-count-stddev": 0.5})
    # fixed clipping has no count to noise: the key is not checked
    Config.from_run_config({"client-dp": "server-fixed", "client-dp-clipped-count-stddev": 0.1})


def _tracked(tmp_path, dp, cfg, offset=0):
    return TrackedStrategy(cfg, dp, RunDir(tmp_path / "run"), [np.zeros(4, np.float32)],
                           full_model_bytes=1, round_offset=offset)


def test_client_level_epsilon_composes_each_rounds_real_rate_across_a_resume(tmp_path):
    cfg = Config.from_run_config({"client-dp": "server-fixed", "fraction-fit": 0.5,
                                  "min-fit-clients": 2, "min-available-clients": 2,
                                  "client-dp-noise-multiplier": 1.1, "server-eval": False})
    params = ndarrays_to_parameters([np.zeros(4, np.float32)])
    dp = ClientLevelDP(cfg, build_aggregator(cfg, [np.zeros(4, np.float32)]))
    s = _tracked(tmp_path, dp, cfg)
    s.configure_fit(1, params, Manager(3))  # 2 of 3
    s.configure_fit(2, params, Manager(8))  # 4 of 8
    m1, m2 = s.client_dp_metrics(1), s.client_dp_metrics(2)
    assert m1["client_dp_sampling_rate"] == pytest.approx(2 / 3)
    assert m2["client_dp_sampling_rate"] == pytest.approx(0.5)
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.1, sample_rate=2 / 3)
    assert m1["client_dp_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    acc.step(noise_multiplier=1.1, sample_rate=0.5)
    assert m2["client_dp_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    # not fraction-fit: accounting at q = 0.5 both rounds would understate epsilon
    assert m2["client_dp_epsilon"] > client_level_epsilon(1.1, 0.5, 2, 1e-5)

    # resume after round 2: earlier rates come from the run's records
    s.run.add_record({"round": 1, **m1})
    s.run.add_record({"round": 2, **m2})
    dp2 = ClientLevelDP(cfg, build_aggregator(cfg, [np.zeros(4, np.float32)]))
    resumed = _tracked(tmp_path, dp2, cfg, offset=2)
    resumed.configure_fit(1, params, Manager(5))  # absolute round 3: 2 of 5
    m3 = resumed.client_dp_metrics(3)
    acc.step(noise_multiplier=1.1, sample_rate=0.4)
    assert m3["client_dp_sampling_rate"] == pytest.approx(0.4)
    assert m3["client_dp_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
