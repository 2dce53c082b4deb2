"""Client-side Flower mods, active only when the server's run asks for them.

One ClientApp serves every configuration, so each mod checks the incoming message and
otherwise passes it through: SecAgg+ runs only when the server runs the SecAgg+ workflow,
client-side clipping only when a client-side DP wrapper sends its clipping norm, and
updates travel as deltas only when the server asks (``send-delta``), which keeps the
values SecAgg+ quantizes small and inside its clipping range.

Order in the ClientApp (outermost first): SecAgg+ masks what the delta mod produced from
what the clipping mod clipped — ``[secagg_mod, delta_mod, clipping_mod]``.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.client.mod import adaptiveclipping_mod, fixedclipping_mod, secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import MessageType, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

SEND_DELTA = "send-delta"
KEY_ADAPTIVE = "client-adaptive-clipping"


def _is_train(msg: Message) -> bool:
    return msg.metadata.message_type == MessageType.TRAIN


def secagg_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for messages of the SecAgg+ workflow only."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if _is_train(msg) else None
    if configs is not None and Key.STAGE in configs:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


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


CLIENT_MODS = [secagg_mod, delta_mod, clipping_mod]
