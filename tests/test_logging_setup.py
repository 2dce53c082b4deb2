"""fatellm_flwr.logging_setup: scoped noise filters, the log level, the per-round line."""

import logging
import warnings

from fatellm_flwr.logging_setup import configure, quiet_known_noise, round_line, set_log_level


def test_known_noise_is_filtered_and_nothing_else():
    emitted = [
        ("`torch.jit.script_method` is deprecated. Please switch to `torch.compile` or "
         "`torch.export`.", DeprecationWarning),
        ("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning),
        ("Tip: In future versions of Ray, Ray will no longer override accelerator visible "
         "devices env var", FutureWarning),
        ("`torch.load` default changed", FutureWarning),  # not ours to hide
        ("something is deprecated", DeprecationWarning),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()
        for message, category in emitted:
            warnings.warn(message, category, stacklevel=1)
    assert [str(w.message) for w in caught] == ["`torch.load` default changed",
                                                "something is deprecated"]


def test_bitsandbytes_kernels_message_is_filtered(caplog):
    quiet_known_noise()
    quiet_known_noise()  # idempotent
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "x")
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]


def test_log_level_applies_to_flower_and_us():
    configure("WARNING")
    assert logging.getLogger("flwr").level == logging.WARNING
    assert logging.getLogger("fatellm_flwr").level == logging.WARNING
    set_log_level("INFO")
    assert logging.getLogger("flwr").level == logging.INFO


def test_round_line_is_one_informative_line():
    line = round_line({"round": 2, "server_accuracy": 0.8667, "server_loss": 0.41234,
                       "fit_train_loss": 0.5, "clients_ok": 3, "clients_failed": 1,
                       "bytes_up": 1.2e6, "bytes_down": 2.4e6, "up_pct_of_full_model": 0.9,
                       "fit_dp_epsilon": 2.13, "round_time_s": 14.24, "zo_num_seeds": 4096})
    assert "\n" not in line
    assert line == ("[round 2] accuracy 0.8667 (loss 0.4123) | train loss 0.5 | clients 3 ok, "
                    "1 failed | up 1.2 MB, down 2.4 MB (0.9% of full model per client) | "
                    "dp eps 2.13 | 14.2 s")
    assert round_line({"round": 0, "server_loss": 2.0}) == "[round 0] loss 2"
