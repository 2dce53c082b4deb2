"""FlexLoRA on the server (Bai et al. 2024, arXiv 2402.11505): Flower's FedAvg with the
aggregate of :func:`fatellm_flwr.flexlora.aggregate` and per-client ranks.

The global state is kept at the largest rank the server serves (``rank``). A client's rank
is learned from the shapes of its first reply; from then on it receives the global state
truncated to its own rank (fewer bytes). A node not seen yet receives the global state and
truncates it itself (:func:`fatellm_flwr.flexlora.fit_to_model`): the same result.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from ..flexlora import aggregate, lora_pairs, rank_of, redistribute, shape_problem
from ..metrics import CommLedger
from ..wire.common import parameters_nbytes


class FlexLoRAFedAvg(FedAvg):
    """FedAvg whose aggregate is FlexLoRA's and whose fit instructions carry each known
    client's own rank."""

    def __init__(self, names: Sequence[str], alpha: float, rank: int, **kwargs):
        super().__init__(**kwargs)
        self.pairs = lora_pairs(names)
        self.alpha, self.rank = alpha, rank
        self.ranks: dict[str, int] = {}  # cid -> LoRA rank seen in its replies

    def problem(self, arrays: list[np.ndarray], reference: list[np.ndarray]) -> str | None:
        return shape_problem(arrays, reference, self.pairs)

    def configure_fit(self, server_round, parameters, client_manager):
        instructions = super().configure_fit(server_round, parameters, client_manager)
        glob = None
        by_rank: dict[int, object] = {}
        out = []
        for proxy, ins in instructions:
            r = self.ranks.get(str(proxy.cid), self.rank)
            if r != self.rank and r not in by_rank:
                glob = glob if glob is not None else parameters_to_ndarrays(parameters)
                by_rank[r] = ndarrays_to_parameters(
                    redistribute(glob, self.pairs, self.alpha, r))
            out.append((proxy, FitIns(by_rank.get(r, ins.parameters), dict(ins.config))))
        return out

    def aggregate_fit(self, server_round, results, failures):
        if not results:
            return None, {}
        states = [parameters_to_ndarrays(res.parameters) for _, res in results]
        for (proxy, _), s in zip(results, states):
            self.ranks[str(proxy.cid)] = rank_of(s, self.pairs)
        agg = aggregate(states, [res.num_examples for _, res in results], self.pairs,
                        self.alpha, self.rank)
        return ndarrays_to_parameters(agg), {}


def count_own_rank_downloads(ledger: CommLedger, rnd: int, parameters,
                             instructions) -> None:
    """The ledger counted the global state for every client: correct it for clients that
    were sent their own (smaller) rank."""
    full = parameters_nbytes(parameters)
    for proxy, ins in instructions:
        if ins.parameters is not parameters:
            ledger.add(rnd, str(proxy.cid), down=parameters_nbytes(ins.parameters) - full)


def server_rank(cfg) -> int:
    """The rank the server keeps the global FlexLoRA state at: the largest it serves."""
    return max([cfg.lora_r, *cfg.lora_rank_list])
