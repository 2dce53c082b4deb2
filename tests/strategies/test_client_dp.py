"""ClientLevelDP: DP-FedAvg clipping/noise around a Flower aggregator, against numpy."""

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from fatellm_flwr.config import Config
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
