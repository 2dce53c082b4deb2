"""Records sent once to a node outside ``Parameters`` (offsite's frozen emulator): the
server's outbox + grid attach them to the node's fit message, the client's mod keeps them
in its ``context.state``."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity

from fatellm_flwr.mods import node_records_mod
from fatellm_flwr.strategies.outbox import NodeOutbox, OutboxGrid

NAME = "fatellm.node.test-arrays"


class _RecordingGrid:
    """The calls the workflow makes on a Grid: remembers what it sends, echoes nothing."""

    def __init__(self):
        self.sent: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        self.sent.extend(messages)
        return []


def _fit_message(node_id: int) -> Message:
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([np.ones(3)]), {}),
                                          True)
    return Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN,
                   group_id="1")


@pytest.fixture(autouse=True)
def _run_id(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)  # a ServerApp's identity
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


def test_records_travel_once_to_their_node_and_land_in_its_state():
    outbox = NodeOutbox()
    payload = np.arange(6, dtype=np.float32).reshape(2, 3)
    outbox.put("7", {NAME: ArrayRecord({"w": Array(payload)}),
                     "fatellm.node.test-meta": ConfigRecord({"id": "abc"})})
    grid = _RecordingGrid()
    wrapped = OutboxGrid(grid, outbox)
    wrapped.send_and_receive([_fit_message(7), _fit_message(8)])
    to7, to8 = grid.sent
    assert NAME in to7.content.array_records and NAME not in to8.content.array_records
    assert list(to7.content.array_records["fitins.parameters"].values())[0].numpy().shape == (3,)
    wrapped.send_and_receive([_fit_message(7)])  # sent once: the next message has none
    assert NAME not in grid.sent[-1].content.array_records

    # client side: the mod moves the records into the node's state before the client runs
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    seen = {}

    def client(msg, ctxt):
        seen["in_content"] = NAME in msg.content.array_records
        return msg

    node_records_mod(to7, ctx, client)
    assert seen["in_content"] is False
    np.testing.assert_array_equal(ctx.state.array_records[NAME]["w"].numpy(), payload)
    assert str(ctx.state.config_records["fatellm.node.test-meta"]["id"]) == "abc"


def test_only_node_records_may_be_queued():
    with pytest.raises(ValueError, match="fatellm.node"):
        NodeOutbox().put("1", {"fitins.parameters": ArrayRecord()})
