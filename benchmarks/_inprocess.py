"""Drive a strategy and its clients in one process, message by message (no Ray, no gRPC).

The exact legacy Flower sequence per round: configure_fit -> client.fit -> aggregate_fit
-> evaluate (server) -> configure_evaluate -> client.evaluate -> aggregate_evaluate, with
each node's ``Context`` (its ``context.state``) kept across rounds as a SuperNode keeps it,
and the records a strategy's ``outbox`` holds for a node (offsite-tuning's frozen emulator)
moved into that node's state before its fit, as the client's ``node_records_mod`` does.
Used by benchmarks that need real models where a simulation's per-actor model copies would
not fit a shared 2-core box (benchmarks/fedmkt.py, benchmarks/flexlora.py, ...).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import ArrayRecord, Context, RecordDict
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from fatellm_flwr.testing import FakeClientManager
from fatellm_flwr.wire.common import move_node_records


def deliver_node_records(strategy, cid: str, state: RecordDict) -> None:
    """What the client's ``node_records_mod`` does with the records the server's
    ``OutboxGrid`` attaches to a node's message: store them in the node's state."""
    outbox = getattr(strategy, "outbox", None)
    if outbox is None:
        return
    content = RecordDict()
    for name, rec in outbox.take(cid).items():
        kind = content.array_records if isinstance(rec, ArrayRecord) else content.config_records
        kind[name] = rec
    move_node_records(content, state)


def drive(strategy, make_client: Callable[[int, Context], object], num_clients: int,
          rounds: int, log: Callable[[str], None] = print,
          stop: Callable[[int], bool] | None = None) -> list[Context]:
    """Run ``rounds`` rounds (fewer if ``stop(round)`` says so after a round);
    ``make_client(partition_id, context)`` builds a client per message (as Flower does).
    Returns the nodes' contexts."""
    contexts = [Context(run_id=1, node_id=i, node_config={}, state=RecordDict(),
                        run_config={}) for i in range(num_clients)]
    manager = FakeClientManager(num_clients)
    params = strategy.initialize_parameters(manager)
    strategy.evaluate(0, params)
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        results = []
        for proxy, ins in strategy.configure_fit(rnd, params, manager):
            pid = int(proxy.cid)
            deliver_node_records(strategy, proxy.cid, contexts[pid].state)
            client = make_client(pid, contexts[pid])
            arrays, n, metrics = client.fit(parameters_to_ndarrays(ins.parameters), ins.config)
            results.append((proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays),
                                          n, metrics)))
        new, _ = strategy.aggregate_fit(rnd, results, [])
        params = new if new is not None else params
        strategy.evaluate(rnd, params)
        eval_results = []
        for proxy, ins in strategy.configure_evaluate(rnd, params, manager):
            pid = int(proxy.cid)
            client = make_client(pid, contexts[pid])
            loss, n, metrics = client.evaluate(parameters_to_ndarrays(ins.parameters),
                                               ins.config)
            eval_results.append((proxy, EvaluateRes(Status(Code.OK, ""), loss, n, metrics)))
        strategy.aggregate_evaluate(rnd, eval_results, [])
        log(f"[drive] round {rnd}: {time.perf_counter() - t0:.1f}s")
        if stop is not None and stop(rnd):
            break
    return contexts
