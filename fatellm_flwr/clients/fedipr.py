"""A node's FedIPR watermark: its secret, kept in ``context.state``, and its metrics.

The secret (a 63-bit key from OS randomness + the carrier kind and names, see
:mod:`fatellm_flwr.privacy.fedipr`) is created on the node's first fit and stored in the
node's Flower ``context.state``, which survives the fresh ClientApp process of every message;
it never leaves the node. With ``fedipr-secret-dir`` set, the node also writes it to
``<dir>/fedipr-secret-<partition-id>.json`` on its own disk (and reuses that file in later
runs), so its owner can prove ownership of a leaked model with
``python -m fatellm_flwr.privacy.fedipr MODEL SECRET.json``.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context
from torch import nn

from ..config import Config
from ..privacy import fedipr

_STATE_KEY = "fatellm.fedipr-secret"
_FALLBACK: dict[tuple[int, str], str] = {}  # callers without a Flower context (unit tests)


def secret_file(cfg: Config, partition_id: int) -> Path | None:
    if not cfg.fedipr_secret_dir:
        return None
    return Path(cfg.fedipr_secret_dir).expanduser() / f"fedipr-secret-{partition_id}.json"


def node_secret(cfg: Config, model: nn.Module, context: Context | None,
                partition_id: int) -> fedipr.Secret:
    """This node's secret: from ``context.state``, else its secret file, else a fresh one."""
    text = None
    if context is not None and _STATE_KEY in context.state.config_records:
        text = str(context.state.config_records[_STATE_KEY]["secret"])
    elif context is None:
        text = _FALLBACK.get((partition_id, cfg.fedipr_carriers))
    path = secret_file(cfg, partition_id)
    if text is None and path is not None and path.exists():
        text = path.read_text()
    if text is not None:
        secret = fedipr.Secret.from_json(text)
        if secret.bits != cfg.fedipr_bits:
            raise ValueError(f"the stored FedIPR secret has {secret.bits} bits but "
                             f"fedipr-bits={cfg.fedipr_bits}")
        if secret.kind != cfg.fedipr_carriers:
            raise ValueError(f"the stored FedIPR secret has {secret.kind} carriers but "
                             f"fedipr-carriers={cfg.fedipr_carriers}")
    else:
        secret = fedipr.secret_for_model(model, cfg.fedipr_blocks, cfg.fedipr_bits,
                                         kind=cfg.fedipr_carriers)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            secret.save(path)
    if context is None:
        _FALLBACK[(partition_id, cfg.fedipr_carriers)] = secret.to_json()
    else:
        context.state.config_records[_STATE_KEY] = ConfigRecord({"secret": secret.to_json()})
    return secret


def detection_metrics(model: nn.Module, secret: fedipr.Secret, partition_id: int,
                      prefix: str = "fedipr_detection") -> dict[str, float]:
    """``{prefix: rate, prefix_p<partition>: rate}``: the rate per client survives the
    server's averaging of client metrics."""
    rate = fedipr.model_detection_rate(model, secret)
    return {prefix: rate, f"{prefix}_p{partition_id}": rate}
