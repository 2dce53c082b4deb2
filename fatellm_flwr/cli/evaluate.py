"""``fatellm evaluate``: a run's model on a dataset (the server's metrics code) or lm-eval.

:func:`evaluate` scores with :func:`fatellm_flwr.metrics.evaluate_model` on the set
:func:`fatellm_flwr.data.server_eval_sets` gives, exactly as the server does each round:
with the run's own dataset and config it reproduces the last round's ``server_*`` metrics.
:func:`lm_eval` runs EleutherAI's lm-evaluation-harness (Gao et al. 2024; optional extra
``lm-eval``) on the same loaded model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data import server_eval_sets, split_pool_and_test, tokenize_dataset
from ..metrics import evaluate_model
from .runs import RunError, load_run_model, resolve_model_folder, run_config

SPLITS = ("test", "all")


def evaluate(run: str | Path, dataset: str | None = None, split: str = "test",
             overrides: Mapping[str, Any] | None = None, device: str = "cpu",
             loaded=None) -> dict[str, float]:
    """Loss, perplexity and the task metric (accuracy / ROUGE-L) of the run's model.

    ``dataset``: any dataset the app reads (default: the run's). ``split``: ``test`` = the
    set the server scores (the run's ``server-eval-dataset``, else ``test-size`` examples
    held out with the run's seed), ``all`` = every row (``max-examples`` still applies).
    ``overrides``: run-config keys for the dataset (``text-column``, ``eval-metric``, ...).
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}; allowed: {', '.join(SPLITS)}")
    folder = resolve_model_folder(run)
    changes = {k.replace("_", "-"): v for k, v in (overrides or {}).items()}
    if dataset:
        changes.update({"dataset": dataset, "server-eval-dataset": ""})
    if split == "all":
        changes["test-size"] = 0
    cfg = run_config(folder.parent).replace(**changes)
    if split == "test":  # exactly the set the server scored (server-eval-dataset or held out)
        task_data, data = server_eval_sets(cfg)
        if task_data is None:
            raise RunError("the run's server held no evaluation data "
                           "(server-eval-dataset='none'): pass --dataset")
    else:
        task_data, data, _, _ = split_pool_and_test(cfg)
    if len(data) == 0:
        raise RunError(f"no examples to evaluate in {cfg.dataset!r} (split={split!r}, "
                       f"test-size={cfg.test_size})")
    model, tokenizer, _ = loaded or load_run_model(folder, device)
    tokenized = tokenize_dataset(data, tokenizer, cfg, task_data)
    metrics = evaluate_model(model, tokenizer, data, tokenized, task_data, cfg)
    return {"examples": float(len(data)), **metrics}


def lm_eval(run: str | Path, tasks: Sequence[str], include_path: str | Path | None = None,
            limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 8,
            device: str = "cpu", loaded=None) -> dict[str, dict[str, Any]]:
    """lm-evaluation-harness ``tasks`` on the run's model: ``{task: {metric: value}}``.

    ``include_path``: a folder of extra task YAMLs (local data works offline).
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise RunError("--lm-eval needs lm-evaluation-harness: "
                       "pip install 'fatellm-flwr[lm-eval]'") from e
    model, tokenizer, _ = loaded or load_run_model(run, device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(include_path)) if include_path else TaskManager()
    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                          num_fewshot=num_fewshot, log_samples=False)
    return {task: {k: v for k, v in res.items() if k != "alias"}
            for task, res in out["results"].items()}
