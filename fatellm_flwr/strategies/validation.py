"""Checks a client's result must pass before it is aggregated."""

from __future__ import annotations

import numpy as np


def shape_problem(arrays: list[np.ndarray], reference: list[np.ndarray]) -> str | None:
    """Why ``arrays`` can't be aggregated with the global state ``reference`` (count,
    shapes, NaN/Inf), or None when they can."""
    if len(arrays) != len(reference):
        return f"sent {len(arrays)} arrays, expected {len(reference)}"
    for i, (a, ref) in enumerate(zip(arrays, reference)):
        if a.shape != ref.shape:
            return f"array {i} has shape {a.shape}, expected {ref.shape}"
        if not np.all(np.isfinite(a)):
            return f"array {i} contains NaN or Inf"
    return None
