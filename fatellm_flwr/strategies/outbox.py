"""Records the server sends to one node once, outside the ``Parameters`` list.

Flower's legacy strategies can only put arrays in ``Parameters`` (aggregated, clipped and
masked like a model update) and scalars in the config. What a node needs once and keeps
(offsite-tuning's frozen emulator) travels instead as its own ``ArrayRecord`` /
``ConfigRecord`` in the node's next fit message: the strategy queues them here per node,
and the ServerApp's :class:`OutboxGrid` attaches them to the outgoing message; the
client's ``node_records_mod`` moves them into the node's ``context.state``.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType
from flwr.serverapp import Grid

from ..wire.common import NODE_RECORD_PREFIX

FIT_PARAMETERS = "fitins.parameters"  # Flower's record of a legacy fit instruction


class NodeOutbox:
    """Per node (cid = str(node id)): records waiting for the node's next fit message."""

    def __init__(self) -> None:
        self._pending: dict[str, dict[str, ArrayRecord | ConfigRecord]] = {}

    def put(self, cid: str, records: dict[str, ArrayRecord | ConfigRecord]) -> None:
        bad = [name for name in records if not name.startswith(NODE_RECORD_PREFIX)]
        if bad:
            raise ValueError(f"node records must be named {NODE_RECORD_PREFIX}*, got {bad}")
        self._pending.setdefault(str(cid), {}).update(records)

    def take(self, cid: str) -> dict[str, ArrayRecord | ConfigRecord]:
        """Remove and return what waits for node ``cid``."""
        return self._pending.pop(str(cid), {})

    def discard(self, cid: str) -> None:
        self._pending.pop(str(cid), None)

    def attach(self, message: Message) -> Message:
        """Add node ``dst``'s waiting records to ``message`` if it carries a fit instruction
        (under SecAgg+: the stage that carries it)."""
        content = message.content
        if (message.metadata.message_type != MessageType.TRAIN
                or FIT_PARAMETERS not in content.array_records):
            return message
        for name, record in self.take(str(message.metadata.dst_node_id)).items():
            if isinstance(record, ArrayRecord):
                content.array_records[name] = record
            else:
                content.config_records[name] = record
        return message


class OutboxGrid(Grid):
    """A Flower ``Grid`` that attaches an outbox's records to the messages it sends."""

    def __init__(self, grid: Grid, outbox: NodeOutbox):
        self._grid, self._outbox = grid, outbox

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages([self._outbox.attach(m) for m in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive([self._outbox.attach(m) for m in messages],
                                           timeout=timeout)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
