"""fatellm: use what a federation produced (generate, evaluate, export, runs).

Every subcommand is a thin layer over a function importable from Python
(:mod:`fatellm_flwr.cli`); errors that say what is wrong exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runs import RunError


def _value(text: str) -> Any:
    """A ``k=v`` value as TOML reads it (``3``, ``0.5``, ``true``, ``"x"``), else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _pairs(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        for pair in item.split():
            key, sep, value = pair.partition("=")
            if not sep:
                raise RunError(f"{pair!r} is not key=value")
            out[key] = _value(value)
    return out


def cmd_runs(args) -> int:
    from .runs import list_runs, runs_table

    infos = list_runs(args.dir)
    print(runs_table(infos) if infos else f"no runs under {args.dir}")
    return 0


def cmd_generate(args) -> int:
    from .generate import generate

    prompts = list(args.prompt or [])
    if args.file:
        prompts += [line.rstrip("\n") for line in Path(args.file).read_text().splitlines()
                    if line.strip()]
    if not prompts:
        raise RunError("give at least one --prompt or a --file with one prompt per line")
    outs = generate(args.run, prompts, max_new_tokens=args.max_new_tokens,
                    do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                    chat=False if args.no_chat_template else None, seed=args.seed,
                    device=args.device)
    for prompt, out in zip(prompts, outs):
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": out}))
        else:
            print(f">>> {prompt}\n{out}\n")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, lm_eval
    from .runs import load_run_model

    loaded = load_run_model(args.run, args.device)
    result: dict[str, Any] = {}
    if not args.lm_eval or args.dataset:
        result["metrics"] = evaluate(args.run, dataset=args.dataset, split=args.split,
                                     overrides=_pairs(args.set or []), loaded=loaded)
    if args.lm_eval:
        tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
        result["lm_eval"] = lm_eval(args.run, tasks, include_path=args.lm_eval_include,
                                    limit=args.limit, num_fewshot=args.num_fewshot,
                                    batch_size=args.batch_size, loaded=loaded)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    for k, v in result.get("metrics", {}).items():
        print(f"{k:>12}  {v:.6g}")
    for task, metrics in result.get("lm_eval", {}).items():
        for k, v in metrics.items():
            print(f"{task}  {k:>24}  {v}")
    return 0


def cmd_export(args) -> int:
    from .export import export

    out = export(args.run, args.out, merge=args.merge, device=args.device,
                 overwrite=args.overwrite)
    print(f"exported to {out}")
    return 0


def cmd_check_config(args) -> int:
    from ..config import check_run_config

    cfg = check_run_config(" ".join(args.overrides), project_dir=args.project)
    print(f"OK: algorithm={cfg.algorithm} model={cfg.model} dataset={cfg.dataset} "
          f"rounds={cfg.num_server_rounds}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fatellm", description=__doc__.splitlines()[0])
    p.add_argument("--log-level", default="WARNING",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("runs", help="list runs: algorithm, rounds, metric, bytes, status")
    r.add_argument("dir", nargs="?", default="outputs", help="a run folder or a folder of runs")
    r.set_defaults(fn=cmd_runs)

    def run_arg(q):
        q.add_argument("run", help="run folder (its final/, else its last round), or a "
                       "model folder inside it (e.g. RUN/round-002)")
        q.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N, mps")

    g = sub.add_parser("generate", help="completions from the run's model")
    run_arg(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--file", help="a text file, one prompt per line")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--no-chat-template", action="store_true",
                   help="raw prompts (default: the run's use-chat-template)")
    g.add_argument("--json", action="store_true", help="one JSON object per line")
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("evaluate", help="accuracy / ROUGE-L / perplexity, or lm-eval tasks")
    run_arg(e)
    e.add_argument("--dataset", help="builtin:<name>, a local file or a hub dataset "
                   "(default: the run's own)")
    e.add_argument("--split", choices=("test", "all"), default="test",
                   help="test: the held-out set the server scores; all: every row")
    e.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="run-config keys for this dataset, e.g. 'text-column=body'")
    e.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-eval tasks")
    e.add_argument("--lm-eval-include", metavar="DIR", help="folder of extra task YAMLs")
    e.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task")
    e.add_argument("--num-fewshot", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_evaluate)

    x = sub.add_parser("export", help="a standalone Hugging Face folder with a model card")
    run_arg(x)
    x.add_argument("out", help="output folder")
    x.add_argument("--merge", action="store_true",
                   help="merge a LoRA/IA3 adapter into its base (peft merge_and_unload)")
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(fn=cmd_export)

    c = sub.add_parser("check-config", help="validate --run-config overrides offline, over "
                       "pyproject's defaults; names an unknown key (the SuperLink does not)")
    c.add_argument("overrides", nargs="*", help='the --run-config string, e.g. '
                   '\'peft-method="ia3" num-server-rounds=5\'')
    c.add_argument("--project", default=None, help="the Flower app folder (its pyproject.toml)")
    c.set_defaults(fn=cmd_check_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from ..logging_setup import configure

    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    configure(args.log_level)
    from ..config import ConfigError
    from ..data import DataError
    from ..models import ModelLoadError

    try:
        return args.fn(args)
    except (RunError, ConfigError, DataError, ModelLoadError, FileNotFoundError) as e:
        print(f"fatellm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
