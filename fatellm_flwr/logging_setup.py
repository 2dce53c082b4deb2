"""Readable run logs: known third-party noise filtered, one line per round, a log level.

:func:`quiet_known_noise` installs warning filters scoped to exact messages that libraries
emit on every client and every round and that a user cannot act on (the filters name the
message, never a whole category or module). :func:`set_log_level` applies the
``log-level`` key to Flower's logger and ours. :func:`round_line` is the one line a round
logs. All are called at the app entry points (``server_app``/``client_app``).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from typing import Any

# (message regex, category): each is a deprecation/tip the user cannot act on
KNOWN_NOISE: tuple[tuple[str, type[Warning]], ...] = (
    # torch 2.13 deprecates TorchScript; transformers/peft/opacus still call torch.jit.*
    (r"`torch\.jit\.\w+` is deprecated", Warning),
    # peft/accelerate read the deprecated alias on every model wrap (transformers >= 5.2)
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    # Ray's one-per-process tip about a future default (shown on the simulation driver)
    (r"Tip: In future versions of Ray, Ray will no longer override accelerator", FutureWarning),
)

# (logger, message regex) logged through `logging` rather than `warnings`
KNOWN_LOG_NOISE: tuple[tuple[str, str], ...] = (
    # bitsandbytes >= 0.49 on every import on AVX512-BF16 CPUs: an optional speed-up package
    # for 4-bit CPU inference (`pip install kernels`); 4-bit on CPU works without it
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from "
                                      r"kernels-community"),
)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class MessageFilter(logging.Filter):
    """Drops the records of one logger whose message matches ``pattern``."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_known_noise() -> None:
    """Ignore exactly the :data:`KNOWN_NOISE` warnings and :data:`KNOWN_LOG_NOISE` log
    records (idempotent; works before or after the emitting module is imported)."""
    for message, category in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, pattern in KNOWN_LOG_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, MessageFilter) and f.pattern.pattern == pattern
                   for f in logger.filters):
            logger.addFilter(MessageFilter(pattern))


def set_log_level(level: str) -> None:
    """Apply ``log-level`` to Flower's logger and this package's loggers."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log-level {level!r}; allowed: {', '.join(LOG_LEVELS)}")
    for name in ("flwr", "fatellm_flwr"):
        logging.getLogger(name).setLevel(level)


def configure(log_level: str = "INFO") -> None:
    """What each app entry point calls once the run config is read: noise filters, the
    level, and transformers' per-load progress bars only at DEBUG (every client prints
    them on every model load)."""
    quiet_known_noise()
    set_log_level(log_level)
    from transformers.utils import logging as hf_logging

    if log_level == "DEBUG":
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


_HEADLINE = ("server_accuracy", "server_rouge-l", "server_perplexity")


def round_line(record: Mapping[str, Any]) -> str:
    """One informative line for a round record (the full record is in metrics.json).

    ``[round 2] accuracy 0.867 (loss 0.412) | clients 3 ok, 0 failed | up 1.2 MB, down
    1.2 MB (0.9% of full model) | eps 2.1 | 14.2 s``
    """
    parts = []
    head = next((k for k in _HEADLINE if k in record), None)
    if head is not None:
        text = f"{head.removeprefix('server_')} {_num(record[head])}"
        if "server_loss" in record:
            text += f" (loss {_num(record['server_loss'])})"
        parts.append(text)
    elif "server_loss" in record:
        parts.append(f"loss {_num(record['server_loss'])}")
    if "fit_train_loss" in record:
        parts.append(f"train loss {_num(record['fit_train_loss'])}")
    if "clients_ok" in record:
        parts.append(f"clients {record['clients_ok']} ok, {record.get('clients_failed', 0)} "
                     "failed")
    if "bytes_up" in record:
        comm = f"up {_mb(record['bytes_up'])}, down {_mb(record.get('bytes_down', 0))}"
        if "up_pct_of_full_model" in record:
            comm += f" ({record['up_pct_of_full_model']:.3g}% of full model per client)"
        parts.append(comm)
    eps = [f"{k.removesuffix('_epsilon').removeprefix('fit_')} eps {_num(v)}"
           for k, v in record.items() if k.endswith("epsilon")]
    parts += eps
    if "round_time_s" in record:
        parts.append(f"{record['round_time_s']:.1f} s")
    return f"[round {record['round']}] " + (" | ".join(parts) or "(no metrics)")


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _mb(n: float) -> str:
    return f"{n / 1e6:.3g} MB" if n >= 1e5 else f"{n / 1e3:.3g} KB"
