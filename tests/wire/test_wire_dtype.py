"""`wire-dtype`: the codec's cast (both directions) and the server aggregating in float32."""

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, parameters_to_ndarrays

from fatellm_flwr.config import Config, ConfigError
from fatellm_flwr.wire.common import (
    decode_arrays,
    encode_arrays,
    from_wire,
    parameters_nbytes,
    to_wire,
)


def test_float16_halves_the_bytes_and_comes_back_as_float32():
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(64, 32)).astype(np.float32), rng.normal(size=7).astype(np.float32)]
    p32, p16 = encode_arrays(arrays), encode_arrays(arrays, "float16")
    assert [a.dtype for a in parameters_to_ndarrays(p16)] == [np.float16] * 2
    ratio = parameters_nbytes(p16) / parameters_nbytes(p32)
    assert 0.5 < ratio < 0.52  # the .npy headers don't shrink
    back = decode_arrays(p16)
    assert [a.dtype for a in back] == [np.float32] * 2
    for a, b in zip(arrays, back):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)
    assert [a.dtype for a in decode_arrays(p32)] == [np.float32] * 2


def test_only_float32_arrays_are_cast():
    coeffs = np.array([1e-9, 3.0], np.float64)  # FedKSeed's exact coefficient vectors
    idx = np.array([1, 2], np.int64)
    out = to_wire([coeffs, idx], "float16")
    assert out[0].dtype == np.float64 and out[1].dtype == np.int64
    np.testing.assert_array_equal(from_wire(out)[0], coeffs)


def test_values_float16_cannot_hold_are_refused():
    with pytest.raises(ValueError, match=r"wire-dtype='float16' cannot carry array 1 .*65504"):
        to_wire([np.zeros(2, np.float32), np.array([1e5], np.float32)], "float16")
    with pytest.raises(ValueError, match="allowed: float32, float16"):
        to_wire([np.zeros(2, np.float32)], "bfloat16")


def test_wire_dtype_key_is_validated():
    with pytest.raises(ConfigError, match="'wire-dtype' has value 'bfloat16'; allowed: float32, "
                                          "float16"):
        Config.from_run_config({"wire-dtype": "bfloat16"})


def test_server_aggregates_float16_replies_in_float32(tmp_path):
    """Weights x example counts would overflow float16 (3e4 x 4 > 65504): the server casts
    the replies back to float32 before FedAvg, keeps its state in float32 and sends float16."""
    from fatellm_flwr.outputs import RunDir
    from fatellm_flwr.strategies.base import TrackedStrategy
    from fatellm_flwr.strategies.homo import build_aggregator
    from fatellm_flwr.testing import FakeClientManager, FakeProxy

    cfg = Config.from_run_config({"server-eval": False, "wire-dtype": "float16"})
    initial = [np.zeros((2, 3), np.float32)]
    s = TrackedStrategy(cfg, build_aggregator(cfg, initial), RunDir(tmp_path / "run"), initial,
                        full_model_bytes=1)
    sent = s.initialize_parameters(FakeClientManager(2))
    assert parameters_to_ndarrays(sent)[0].dtype == np.float16
    a, b = np.full((2, 3), 4.0, np.float32), np.full((2, 3), 2.0, np.float32)
    replies = [(FakeProxy("a"), FitRes(Status(Code.OK, ""), encode_arrays([a], "float16"), 30000,
                                       {})),
               (FakeProxy("b"), FitRes(Status(Code.OK, ""), encode_arrays([b], "float16"), 10000,
                                       {}))]
    params, _ = s.aggregate_fit(1, replies, [])
    assert s.current[0].dtype == np.float32
    np.testing.assert_allclose(s.current[0], 3.5)  # (4 x 3e4 + 2 x 1e4) / 4e4
    out = parameters_to_ndarrays(params)[0]
    assert out.dtype == np.float16 and np.all(out == np.float16(3.5))


def test_homo_round_in_process_halves_bytes_both_ways(tiny_model_dir, tiny_classification_file,
                                                      tmp_path):
    """Strategy -> client -> strategy without Flower's transport: what each side puts on
    the wire is float16, half the bytes of a float32 round, and the state stays float32."""
    from flwr.common import ndarrays_to_parameters

    from fatellm_flwr.clients.homo import HomoClient
    from fatellm_flwr.models import clear_model_cache
    from fatellm_flwr.outputs import RunDir
    from fatellm_flwr.strategies.homo import HomoStrategy
    from fatellm_flwr.testing import FakeClientManager

    nbytes = {}
    for wire in ("float32", "float16"):
        clear_model_cache()
        cfg = Config(model=str(tiny_model_dir("llama")), dataset=str(tiny_classification_file),
                     test_size=10, partitioner="iid", local_steps=1, max_length=32,
                     server_eval=False, plots=False, wire_dtype=wire)
        s = HomoStrategy(cfg, RunDir.create(tmp_path / wire, "run", "homo"))
        cm = FakeClientManager(2)
        proxy, ins = s.configure_fit(1, s.initialize_parameters(cm), cm)[0]
        down = parameters_nbytes(ins.parameters)
        arrays, n, metrics = HomoClient(cfg, 0, 2).fit(parameters_to_ndarrays(ins.parameters),
                                                       ins.config)
        assert {a.dtype for a in arrays} == {np.dtype(wire)}
        up = ndarrays_to_parameters(arrays)
        nbytes[wire] = (down, parameters_nbytes(up))
        params, _ = s.aggregate_fit(1, [(proxy, FitRes(Status(Code.OK, ""), up, n, metrics))], [])
        assert {a.dtype for a in s.current} == {np.dtype(np.float32)}
        assert {a.dtype for a in parameters_to_ndarrays(params)} == {np.dtype(wire)}
    for i in (0, 1):  # the values halve exactly; each tensor's 128-byte .npy header stays
        b32, b16 = nbytes["float32"][i], nbytes["float16"][i]
        headers = 2 * b16 - b32
        assert headers == 128 * len(arrays), nbytes
        assert b16 - headers == (b32 - headers) // 2
    clear_model_cache()
