"""Use what a federation produced: the ``fatellm`` command and the functions behind it.

``fatellm runs [DIR]``, ``fatellm generate RUN``, ``fatellm evaluate RUN``,
``fatellm export RUN OUT [--merge]`` (see :mod:`fatellm_flwr.cli.main`); from Python::

    from fatellm_flwr.cli import evaluate, export, generate, list_runs, load_run_model
"""

from .evaluate import evaluate, lm_eval
from .export import export
from .generate import generate
from .runs import RunError, RunInfo, list_runs, load_run_model, read_run, runs_table

__all__ = ["RunError", "RunInfo", "evaluate", "export", "generate", "list_runs", "lm_eval",
           "load_run_model", "read_run", "runs_table"]
