"""Server-side evaluation as an injected function (as Flower's strategies take
``evaluate_fn``): the strategy stays model-agnostic, the evaluator knows the model."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..config import Config
from ..data import server_eval_sets, tokenize_dataset
from ..metrics import evaluate_model

EvaluateFn = Callable[[list[np.ndarray]], dict[str, float]]


class HeldOutSet:
    """The server's evaluation set (``server-eval-dataset``; by default the test split held
    out of ``dataset``), loaded and tokenized on first use."""

    def __init__(self, cfg: Config, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self._sets: tuple | None = None

    def get(self) -> tuple:
        """``(task data, raw test set, tokenized test set)``."""
        if self._sets is None:
            task_data, test = server_eval_sets(self.cfg)
            if task_data is None:  # server-eval-dataset=none: the server holds no data
                self._sets = (None, test, test)
                return self._sets
            self._sets = (task_data, test, tokenize_dataset(test, self.tokenizer, self.cfg,
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
