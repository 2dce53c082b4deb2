"""Helpers shared by the benchmark scripts (not a public API).

- :func:`app_config`: the run config exactly as ``flwr run .`` builds it (the defaults of
  ``[tool.flwr.app.config]`` in pyproject.toml + overrides), validated by the package's
  own :class:`~fatellm_flwr.config.Config`, so in-process baselines and the Flower
  simulation train with the same settings.
- :func:`run_flwr`: ``flwr run .`` in the simulation engine with a private FLWR_HOME and
  free ports (as ``tests/conftest.py`` does); the detached local SuperLink it starts is
  stopped afterwards by matching that FLWR_HOME in ``/proc/*/cmdline``.
- markdown tables, medians, machine description, results files.
"""

from __future__ import annotations

import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tomllib  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# FATELLM_BENCH_RESULTS_DIR: write results elsewhere (the notebooks' tiny CI runs do)
RESULTS = Path(os.environ.get("FATELLM_BENCH_RESULTS_DIR")
               or Path(__file__).resolve().parent / "results")
TIMING_NOTE = ("Absolute timings depend on the machine and its load; ratios come from "
               "side-by-side measurements in one run (see the body for repetitions)")


# --------------------------------------------------------------------------- config
def pyproject_app_config() -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the repo's pyproject.toml (what `flwr run .` starts from)."""
    with (REPO / "pyproject.toml").open("rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def app_config(overrides: dict[str, Any]):
    """The validated :class:`Config` a `flwr run . --run-config <overrides>` would use."""
    from fatellm_flwr.config import Config

    return Config.from_run_config({**pyproject_app_config(), **overrides})


def tiny_model(tmp: Path | None = None, arch: str = "llama") -> str:
    """Path of a freshly built tiny random model (``fatellm_flwr.testing``), for quick checks."""
    from fatellm_flwr.testing import build_tiny_model

    out = Path(tmp or tempfile.mkdtemp(prefix="fatellm-bench-tiny-")) / f"tiny-{arch}"
    if not (out / "config.json").exists():
        build_tiny_model(arch, out)
    return str(out)


def resolve_model_arg(model: str) -> str:
    """``tiny`` / ``tiny:<arch>`` -> a built tiny model folder; anything else unchanged."""
    if model == "tiny" or model.startswith("tiny:"):
        arch = model.split(":", 1)[1] if ":" in model else "llama"
        return tiny_model(Path(tempfile.gettempdir()) / "fatellm-bench-tiny", arch)
    return model


# --------------------------------------------------------------------------- flwr run
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def kill_matching(marker: str) -> list[int]:
    """SIGTERM every process whose command line contains ``marker`` (our FLWR_HOME)."""
    killed = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            try:
                os.kill(int(proc.name), signal.SIGTERM)
                killed.append(int(proc.name))
            except ProcessLookupError:
                pass
    return killed


def run_flwr(run_config: dict[str, Any], num_supernodes: int, num_cpus: float = 1,
             timeout: int = 3600, log_path: Path | None = None) -> tuple[str, float]:
    """`flwr run . --stream` in the simulation engine; returns ``(output, wall seconds)``.

    Uses a private FLWR_HOME and free ports, and stops the detached local SuperLink (and
    whatever else mentions that FLWR_HOME) when done, even on failure.
    """
    home = Path(tempfile.mkdtemp(prefix="fatellm-bench-flwr-home-"))
    env = {**os.environ, "FLWR_HOME": str(home),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
    cmd = [str(Path(sys.executable).with_name("flwr")), "run", str(REPO), "--stream",
           *(["--run-config", overrides] if overrides else []), "--federation-config",
           f"num-supernodes={num_supernodes} client-resources-num-cpus={num_cpus}"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=REPO)
        out = proc.stdout + proc.stderr
    finally:
        kill_matching(str(home))
    wall = time.perf_counter() - t0
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(out)
    if proc.returncode != 0:
        raise RuntimeError(f"flwr run failed ({proc.returncode}):\n{out[-6000:]}")
    return out, wall


def read_metrics(output_dir: str | Path, run_name: str) -> list[dict[str, Any]]:
    return json.loads((Path(output_dir) / run_name / "metrics.json").read_text())


# --------------------------------------------------------------------------- reporting
def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.{digits}g}" if abs(v) < 1e6 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    out += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(out)


def load_avg() -> tuple[float, float, float] | None:
    """``os.getloadavg()`` (1, 5, 15 min), or None where the OS has none."""
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return None


def fmt_duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def spread(xs: Sequence[float]) -> tuple[float, float, float]:
    """``(min, median, max)`` of ``xs`` (nan for an empty list)."""
    if not xs:
        return (float("nan"),) * 3
    return float(min(xs)), median(xs), float(max(xs))


def fmt_spread(xs: Sequence[float], digits: int = 3, unit: str = "") -> str:
    """``median (min-max, n=N)``: how a repeated figure is reported everywhere."""
    lo, mid, hi = spread(xs)
    return (f"{mid:.{digits}g}{unit} (min {lo:.{digits}g}, max {hi:.{digits}g}, "
            f"n={len(xs)})")


class Interleaved:
    """Repeated, interleaved measurement of several arms, with the machine's load.

    ``run(repeats)`` calls every arm once per repetition in a fixed order (A, B, C, A, B,
    C, ...), so slow drifts of a shared machine hit every arm alike, and samples
    ``os.getloadavg()`` before each call. ``results[arm]`` holds what each call returned,
    ``loads`` the 1-minute load before each call. :meth:`ratios` pairs repetitions
    (``num(rep) / den(rep)``), :meth:`load_note` says how loaded the box was.
    """

    def __init__(self, arms: dict[str, Any]):
        self.arms = dict(arms)
        self.results: dict[str, list[Any]] = {a: [] for a in self.arms}
        self.loads: list[float] = []

    def run(self, repeats: int, log: Any = print) -> Interleaved:
        if repeats < 1:
            raise ValueError("repeats must be >= 1")
        for rep in range(repeats):
            for name, fn in self.arms.items():
                load = load_avg()
                if load is not None:
                    self.loads.append(load[0])
                t0 = time.perf_counter()
                self.results[name].append(fn(rep))
                log(f"[interleaved] rep {rep} {name}: {time.perf_counter() - t0:.1f}s "
                    f"(load {load[0] if load else '?'})")
        return self

    def values(self, arm: str, key: Any = None) -> list[Any]:
        return [r if key is None else key(r) for r in self.results[arm]]

    def ratios(self, num: str, den: str, key: Any = None) -> list[float]:
        """Per-repetition ratios ``key(num result) / key(den result)``."""
        return [a / b for a, b in zip(self.values(num, key), self.values(den, key))]

    def load_note(self) -> str:
        if not self.loads:
            return "machine load not available"
        lo, mid, hi = spread(self.loads)
        return (f"1-min load average during the measurements: median {mid:.2f} (min "
                f"{lo:.2f}, max {hi:.2f}) on {os.cpu_count()} logical CPUs, sampled before "
                f"each of {len(self.loads)} calls{shared_box_note()}; ratios pair "
                f"measurements run back to back.")


def run_child(cmd: Sequence[str], label: str) -> dict:
    """Run a benchmark's child process; its result is the last ``RESULT <json>`` line it
    printed (a child per arm keeps peak-memory figures apart)."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env={**os.environ})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {label} failed ({proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def shared_box_note() -> str:
    """``; <note>`` from ``$FATELLM_BENCH_NOTE`` (e.g. "other jobs shared this box"), or ""."""
    note = os.environ.get("FATELLM_BENCH_NOTE", "").strip()
    return f"; {note}" if note else ""


def machine_line() -> str:
    import torch

    try:
        load = os.getloadavg()
        load_s = f", load avg {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} when written"
    except OSError:
        load_s = ""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
            f"{load_s}; python {platform.python_version()}, torch {torch.__version__}")


SUMMARY_START = "<!-- readme-summary -->"
SUMMARY_END = "<!-- /readme-summary -->"


def summary_block(rows: Sequence[tuple[str, str]]) -> list[str]:
    """The README rows of a results file: ``(question, result)`` pairs between markers
    that ``scripts/readme_results.py`` copies into the README's benchmark block."""
    out = ["", "## Summary (copied into the README by `scripts/readme_results.py`)", "",
           SUMMARY_START, "| question | result |", "| --- | --- |"]
    for q, r in rows:
        if "|" in q + r or "\n" in q + r:
            raise ValueError(f"a summary cell may not hold '|' or a newline: {q!r} {r!r}")
        out.append(f"| {q} | {r} |")
    return out + [SUMMARY_END]


def emit(name: str, title: str, body: str, command: str, notes: Sequence[str] = (),
         write: bool = True, summary: Sequence[tuple[str, str]] = ()) -> str:
    """Print a markdown report and write it (unless ``write`` is false) to
    ``benchmarks/results/<name>.md``; ``summary`` rows go into the README."""
    parts = [f"# {title}", "", f"Command: `{command}`", "", f"Machine: {machine_line()}. "
             f"{TIMING_NOTE}{shared_box_note()}.", "", body]
    if notes:
        parts += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if summary:
        parts += summary_block(summary)
    text = "\n".join(parts) + "\n"
    print(text, flush=True)
    if write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.md").write_text(text)
    return text


def command_line() -> str:
    import shlex

    script = Path(sys.argv[0]).resolve()
    shown = str(script.relative_to(REPO)) if script.is_relative_to(REPO) else sys.argv[0]
    return "python " + shlex.join([shown, *sys.argv[1:]])


def status_mb(key: str) -> float:
    """A memory field of /proc/self/status in MB (VmRSS, RssAnon, RssFile, VmHWM...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")
