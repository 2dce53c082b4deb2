"""Server-side evaluation as an injected function (as Flower's strategies take
``evaluate_fn``): the strategy stays model-agnostic, the evaluator knows the model."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..config import Config
from ..data import server_eval_sets, server_val_set, tokenize_dataset
from ..metrics import evaluate_model

EvaluateFn = Callable[[list[np.ndarray]], dict[str, float]]


class HeldOutSet:
    """The server's evaluation set (``server-eval-dataset``; by default the test split held
    out of ``dataset``), or with ``split="val"`` its validation set (``server-val-size``),
    loaded and tokenized on first use."""

    def __init__(self, cfg: Config, tokenizer, split: str = "test"):
        if split not in ("test", "val"):
            raise ValueError(f"split={split!r}; allowed: test, val")
        self.cfg, self.tokenizer, self.split = cfg, tokenizer, split
        self._sets: tuple | None = None

    def get(self) -> tuple:
        """``(task data, raw set, tokenized set)``."""
        if self._sets is None:
            load = server_eval_sets if self.split == "test" else server_val_set
            task_data, raw = load(self.cfg)
            if task_data is None:  # the server holds no data (or no validation set)
                self._sets = (None, raw, raw)
                return self._sets
            self._sets = (task_data, raw, tokenize_dataset(raw, self.tokenizer, self.cfg,
                                                           task_data))
        return self._sets


def model_evaluator(model, tokenizer, cfg: Config, load_state: Callable[[list[np.ndarray]],
                                                                        None],
                    test: HeldOutSet) -> EvaluateFn:
    """``arrays -> metrics``: load the global state into ``model`` (``load_state``) and
    evaluate it on the held-out set (``loss`` first; ``{}`` when the set is empty)."""

    def evaluate(arrays: list[np.ndarray]) -> dict[str, float]:
        task_data, raw, tokenized = test.get()
        if len(raw) == 0:
            return {}
        load_state(arrays)
        return evaluate_model(model, tokenizer, raw, tokenized, task_data, cfg)

    return evaluate
