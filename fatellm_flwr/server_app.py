"""The Flower ServerApp: run config -> algorithm -> strategy -> rounds -> outputs."""

from __future__ import annotations

import json
from logging import INFO

from flwr.app import Context
from flwr.common.logger import log
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from .algorithms import get_algorithm
from .config import Config
from .logging_setup import configure as configure_logging
from .logging_setup import quiet_known_noise
from .metrics import CommLedger
from .outputs import RunDir
from .strategies.outbox import OutboxGrid
from .tracking import open_tracker

quiet_known_noise()  # before Ray and the model libraries warn in this process
app = ServerApp()


def build_strategy(cfg: Config):
    """``(strategy, rounds still to run)``, resuming from ``cfg.resume_from`` when set."""
    strategy_cls = get_algorithm(cfg).strategy_class()
    if cfg.resume_from:
        run = RunDir(cfg.resume_from)
        done, arrays, meta = run.load_checkpoint()
        if meta.get("algorithm") != cfg.algorithm:
            raise ValueError(f"resume-from={cfg.resume_from!r} holds a "
                             f"{meta.get('algorithm')!r} run, not {cfg.algorithm!r}")
        glob, state = strategy_cls.split_checkpoint(arrays)
        log(INFO, "Resuming %s from round %d in %s", cfg.algorithm, done, run.path)
        strategy = strategy_cls(cfg, run, initial=glob, round_offset=done,
                                ledger=CommLedger.from_json(meta.get("ledger", {})),
                                strategy_state=state)
        return strategy, cfg.num_server_rounds - done
    run = RunDir.create(cfg.output_dir, cfg.run_name, cfg.algorithm)
    (run.path / "config.json").write_text(json.dumps(cfg.to_run_config(), indent=2))
    return strategy_cls(cfg, run), cfg.num_server_rounds


def _count_or_fraction(value: float) -> int | float:
    """SecAgg+ takes a count (> 1) or a fraction of the sampled clients (<= 1)."""
    return int(value) if value > 1 else float(value)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = Config.from_run_config(context.run_config)
    configure_logging(cfg.log_level)
    strategy, rounds = build_strategy(cfg)
    log(INFO, "fatellm-flwr: algorithm=%s model=%s dataset=%s rounds=%d, output %s",
        cfg.algorithm, cfg.model, cfg.dataset, rounds, strategy.run.path)
    if rounds <= 0:
        log(INFO, "Nothing to do: the run already completed %d rounds", cfg.num_server_rounds)
        return
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds),
                           strategy=strategy)
    fit_workflow = None
    if cfg.secure_aggregation:
        fit_workflow = SecAggPlusWorkflow(
            num_shares=_count_or_fraction(cfg.secagg_num_shares),
            reconstruction_threshold=_count_or_fraction(cfg.secagg_reconstruction_threshold),
            # client-level DP sends every clipped update with weight 1 (uniform DP-FedAvg)
            max_weight=1.0 if cfg.client_dp.startswith("client-") else cfg.secagg_max_weight,
            clipping_range=cfg.secagg_clipping_range,
            quantization_range=cfg.secagg_quantization_range)
        log(INFO, "Secure aggregation: SecAgg+ (%s shares, threshold %s)",
            cfg.secagg_num_shares, cfg.secagg_reconstruction_threshold)
    strategy.run.attach_tracker(open_tracker(cfg.tracker, strategy.run.path,
                                             cfg.to_run_config()))
    try:
        # records a node needs once (offsite's frozen emulator) ride along its fit message
        DefaultWorkflow(fit_workflow=fit_workflow)(OutboxGrid(grid, strategy.outbox), legacy)
        summary = strategy.finish()
    finally:
        strategy.run.close_tracker()
    log(INFO, "Summary (%s):\n%s", strategy.run.path, summary)
    _write_server_resources(strategy.run.path)


def _write_server_resources(run_path) -> None:
    """The ServerApp process's peak RSS (``server_resources.json``; benchmarks/scale.py)."""
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    (run_path / "server_resources.json").write_text(json.dumps({"peak_rss_mb": peak_mb}))
    log(INFO, "ServerApp peak RSS: %.0f MB", peak_mb)
