"""A causal LM moved between FedKSeed global states by replaying seed coefficients.

Pure torch/numpy (no Flower): used by the FedKSeed client (its rebuilt model) and server
(its evaluation copy). FedKSeed: Qin et al. 2023, arXiv 2312.06353.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .zo import apply_seed_updates, z_stream, zo_parameters


class ZoModel:
    """A causal LM whose tuned tensors are ``x0 - sum_s applied[s] z(s)``, tracked exactly.

    ``applied`` (float64, K) is what has been subtracted from the start weights ``x0`` along
    each candidate seed's direction. :meth:`move_to` reaches any other coefficient vector by
    generating each seed's z once per tensor with its coefficient difference (the cost of
    a replay = seeds that differ, never steps or rounds). :meth:`record_steps` books the
    client's own local steps, so the next :meth:`move_to` also undoes them in the same
    pass. With weight decay the local steps are not linear in z: they are booked with their
    exact decay factors and undone exactly (scale the 2-D+ tensors back by
    ``(1 - lr wd)^-T`` and add the decayed coefficients).
    """

    def __init__(self, model: torch.nn.Module, seeds: np.ndarray, exclude_embeddings: bool):
        self.model = model.eval()
        self.params = [p for _, p in zo_parameters(model, exclude_embeddings)]
        self.seeds = np.asarray(seeds, dtype=np.int64)
        self.applied = np.zeros(len(self.seeds), dtype=np.float64)
        self._pending: tuple[np.ndarray, np.ndarray, float] | None = None

    @property
    def k(self) -> int:
        return len(self.seeds)

    @torch.no_grad()
    def move_to(self, target: np.ndarray) -> int:
        """Bring the weights to ``x0 - sum_s target[s] z(s)``; returns the seeds replayed."""
        target = np.asarray(target, dtype=np.float64)
        if target.shape != self.applied.shape:
            raise ValueError(f"coefficients of shape {target.shape}, expected {self.applied.shape}")
        diff = target - self.applied
        if self._pending is None:
            support = np.flatnonzero(diff)
            apply_seed_updates(self.params, {int(self.seeds[i]): float(diff[i])
                                             for i in support})
        else:
            u_matrix, u_vector, scale = self._pending
            c_matrix, c_vector = diff - scale * u_matrix, diff - u_vector
            support = np.flatnonzero((c_matrix != 0) | (c_vector != 0))
            self._apply_split(support, c_matrix, c_vector, scale)
        self.applied = target.copy()
        self._pending = None
        return int(support.size)

    def _apply_split(self, support: np.ndarray, c_matrix: np.ndarray, c_vector: np.ndarray,
                     scale: float) -> None:
        """``p <- scale p - sum c z`` on 2-D+ tensors, ``p <- p - sum c z`` on the others."""
        order = support[np.argsort(self.seeds[support], kind="stable")]
        picks = [[j for j in order if (c_matrix if p.ndim >= 2 else c_vector)[j] != 0.0]
                 for p in self.params]
        stream = z_stream([(p.shape, int(self.seeds[j]), i)
                           for i, p in enumerate(self.params) for j in picks[i]])
        for p, js in zip(self.params, picks):
            matrix = p.ndim >= 2
            coeffs = c_matrix if matrix else c_vector
            acc_dtype = torch.promote_types(p.dtype, torch.float32)
            delta = torch.zeros(p.shape, dtype=acc_dtype)
            for j in js:
                delta.add_(next(stream).to(acc_dtype), alpha=float(coeffs[j]))
            new = p.to(acc_dtype) * (scale if matrix else 1.0) - delta.to(p.device)
            p.copy_(new)

    def record_steps(self, indices: Sequence[int], gs: Sequence[float], lr: float,
                     weight_decay: float = 0.0) -> None:
        """Book local ZO steps that were applied in place (in order, skipped ones left out)."""
        idx = np.asarray(indices, dtype=np.int64)
        g = np.asarray(gs, dtype=np.float64)
        if self._pending is not None:
            raise RuntimeError("local steps already booked: call move_to() first")
        if weight_decay == 0.0:
            np.add.at(self.applied, idx, lr * g)
            return
        decay = 1.0 - lr * weight_decay
        after = decay ** np.arange(len(idx) - 1, -1, -1, dtype=np.float64)  # decays after step j
        u_matrix = np.zeros(self.k)
        u_vector = np.zeros(self.k)
        np.add.at(u_matrix, idx, lr * g * after)
        np.add.at(u_vector, idx, lr * g)
        self._pending = (u_matrix, u_vector, decay ** -float(len(idx)))
