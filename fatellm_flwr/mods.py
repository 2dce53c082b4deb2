"""Client-side Flower mods, active only when the server's run asks for them.

One ClientApp serves every configuration, so each mod checks the incoming message and
otherwise passes it through: SecAgg+ runs only when the server runs the SecAgg+ workflow,
client-side clipping only when a client-side DP wrapper sends its clipping norm, and
updates travel as deltas only when the server asks (``send-delta``), which keeps the
values SecAgg+ quantizes small and inside its clipping range.

Order in the ClientApp (outermost first): records sent for the node go to its state, then
SecAgg+ masks what the delta mod produced from what the clipping mod clipped —
``[node_records_mod, secagg_mod, delta_mod, clipping_mod]``.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.client.mod import adaptiveclipping_mod, fixedclipping_mod, secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import MessageType, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from .wire.common import KEY_ADAPTIVE, METRIC_SECAGG_UP, SEND_DELTA, move_node_records

__all__ = ["CLIENT_MODS", "KEY_ADAPTIVE", "SEND_DELTA", "check_secagg_weight", "clipping_mod",
           "delta_mod", "node_records_mod", "secagg_mod"]


def _is_train(msg: Message) -> bool:
    return msg.metadata.message_type == MessageType.TRAIN


def check_secagg_weight(num_examples: int, max_weight: float) -> None:
    """Refuse a SecAgg+ weight above ``secagg-max-weight``: Flower only warns, then scales
    the update by ``num_examples / max_weight`` > 1, clips it to the clipping range and can
    overflow the modular sum, so the aggregate would be silently wrong."""
    if max_weight > 0 and num_examples > max_weight:
        raise ValueError(
            f"secagg-max-weight={max_weight:g} is below this client's weight {num_examples} "
            "(its training examples): SecAgg+ would clip or overflow its update. Set "
            f"secagg-max-weight to at least the largest client's example count (>= "
            f"{num_examples}).")


def _weight_checked(call_next: ClientAppCallable) -> ClientAppCallable:
    """``call_next`` whose fit result is checked against SecAgg+'s ``max_weight``."""

    def checked(msg: Message, ctxt: Context) -> Message:
        out = call_next(msg, ctxt)
        if not out.has_error():
            fit_res = compat.recorddict_to_fitres(out.content, keep_input=True)
            state = ctxt.state.config_records.get(RECORD_KEY_STATE, {})
            check_secagg_weight(fit_res.num_examples, float(state.get(Key.MAX_WEIGHT, 0.0)))
        return out

    return checked


def node_records_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Keep the records the server sent for this node (``fatellm.node.*``, e.g. offsite's
    frozen emulator, sent once) in the node's ``context.state``, where they persist across
    rounds and fresh processes."""
    move_node_records(msg.content, ctxt.state)
    return call_next(msg, ctxt)


def secagg_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for messages of the SecAgg+ workflow only; the client's
    weight is checked against ``secagg-max-weight`` and the size of the masked vector it
    sends is reported (``secagg-upload-bytes``) for the server's byte ledger."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if _is_train(msg) else None
    if configs is None or Key.STAGE not in configs:
        return call_next(msg, ctxt)
    stage = configs[Key.STAGE]
    out = secaggplus_mod(msg, ctxt, _weight_checked(call_next))
    if stage == Stage.COLLECT_MASKED_VECTORS and not out.has_error():
        masked = out.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        metrics = out.content.config_records.get("fitres.metrics")
        if metrics is not None:
            metrics[METRIC_SECAGG_UP] = int(sum(len(b) for b in masked))
    return out


def delta_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Send ``trained - received`` instead of the trained arrays when asked to."""
    if not _is_train(msg) or "fitins.config" not in msg.content.config_records:
        return call_next(msg, ctxt)
    fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    if not fit_ins.config.get(SEND_DELTA, False):
        return call_next(msg, ctxt)
    received = parameters_to_ndarrays(fit_ins.parameters)
    out = call_next(msg, ctxt)
    if out.has_error():
        return out
    fit_res = compat.recorddict_to_fitres(out.content, keep_input=True)
    trained = parameters_to_ndarrays(fit_res.parameters)
    fit_res.parameters = ndarrays_to_parameters([t - r for t, r in zip(trained, received)])
    out.content = compat.fitres_to_recorddict(fit_res, keep_input=True)
    return out


def clipping_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side fixed/adaptive clipping mod when the server's wrapper asks; the
    update then counts as one example, so every aggregate of clipped updates is uniform."""
    if not _is_train(msg) or "fitins.config" not in msg.content.config_records:
        return call_next(msg, ctxt)
    config = msg.content.config_records["fitins.config"]
    if KEY_CLIPPING_NORM not in config:
        return call_next(msg, ctxt)
    mod = adaptiveclipping_mod if config.get(KEY_ADAPTIVE, False) else fixedclipping_mod
    out = mod(msg, ctxt, call_next)
    if out.has_error():
        return out
    # DP-FedAvg averages clipped updates uniformly (also inside SecAgg+'s weighted sum)
    fit_res = compat.recorddict_to_fitres(out.content, keep_input=True)
    fit_res.num_examples = 1
    out.content = compat.fitres_to_recorddict(fit_res, keep_input=True)
    return out


CLIENT_MODS = [node_records_mod, secagg_mod, delta_mod, clipping_mod]
