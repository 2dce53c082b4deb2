"""Shared fixtures: offline settings and tiny models of each supported family."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models: one thread is fastest, and much faster when the cores are shared
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from fatellm_flwr.testing import ARCHITECTURES, build_tiny_model  # noqa: E402

# ------------------------------------------------------------------ pytest-xdist (-n 2)
# Tests sharing an expensive fixture (Flower runs, a running deployment) must run on one
# worker, or each worker would build the fixture again: nodeid prefix -> group. xdist's
# own `--dist loadgroup` cannot do it here (xdist 3.8 tags a group by rewriting
# `item._nodeid`, which pytest 9.2's `nodeid` no longer reads).
XDIST_GROUPS = {"tests/cli/": "cli_runs", "tests/test_simulation_wire.py::": "cli_runs",
                "tests/test_deployment.py::": "deployment"}
SHARED_FIXTURES = {"cli_runs": "cli_runs", "deployment": "deployment"}  # fixture -> group
# tests that start Flower processes or a notebook kernel: scheduled first under xdist so the
# hundreds of quick tests even out the two workers' finishing times
HEAVY_FIXTURES = {"run_flwr", "cli_runs", "deployment", "flwr_app", "execute_notebook"}


def xdist_group(nodeid: str) -> str | None:
    return next((g for prefix, g in XDIST_GROUPS.items() if nodeid.startswith(prefix)), None)


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for fixture in names & SHARED_FIXTURES.keys():
            assert xdist_group(item.nodeid) == SHARED_FIXTURES[fixture], (
                f"{item.nodeid} uses {fixture}: add its path to XDIST_GROUPS in conftest.py")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts alike (stable sort)
        items.sort(key=lambda item: not (
            HEAVY_FIXTURES & set(getattr(item, "fixturenames", ()))
            or "test_notebooks_" in item.nodeid))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`-n N` (default `--dist load`): xdist's per-scope scheduler with one scope per
    test, except the XDIST_GROUPS, each sent whole to one worker."""
    if config.getoption("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid) or nodeid

    return SharedFixtureScheduling(config, log)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: ``tiny_model_dir("llama")`` -> path of a saved tiny model (cached per session)."""
    cache: dict[str, object] = {}

    def make(arch: str = "llama"):
        if arch not in cache:
            cache[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return cache[arch]

    return make


@pytest.fixture(scope="session", params=ARCHITECTURES)
def any_arch(request):
    return request.param


# --------------------------------------------------------------------------- simulations
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree_matching(marker: str) -> None:
    """Stop every process whose command line mentions ``marker`` (our private FLWR_HOME)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmd and int(proc.name) != os.getpid():
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="session")
def flwr_env(tmp_path_factory):
    """Environment for `flwr run` with a private FLWR_HOME and free local-SuperLink ports.

    The local simulation SuperLink that `flwr run` starts is detached; it is stopped at
    the end of the session.
    """
    home = tmp_path_factory.mktemp("flwr-home")
    env = {**os.environ, "FLWR_HOME": str(home),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    yield env
    _kill_tree_matching(str(home))


@pytest.fixture(scope="session")
def flwr_app(tmp_path_factory) -> Path:
    """The app exactly as `flwr run .` ships it, unpacked once per session into a folder
    that `flwr run <folder>` turns into the very same FAB.

    `flwr run .` builds the FAB by walking the whole checkout first (with CI's in-repo
    .venv and .git, ~90,000 files: 5-10 s of CPU per run) and only then filters it down
    to ~110 files. Here Flower's own builder builds the repo's FAB once, the folder gets
    its files, and the check below proves a FAB built from the folder is byte-identical
    (same sha256, so the same app id/hash the SuperLink installs)."""
    import hashlib
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(REPO)
    app = tmp_path_factory.mktemp("flwr-app")
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        for name in z.namelist():
            if not name.startswith(".info/"):  # the builder's manifest, rebuilt each time
                z.extract(name, app)
    assert hashlib.sha256(build_fab_from_disk(app)).digest() == hashlib.sha256(fab).digest()
    return app


@pytest.fixture(scope="session")
def run_flwr(flwr_env, flwr_app):
    """``run_flwr(run_config: dict, num_supernodes=3)``: `flwr run` of this app (the same
    FAB as `flwr run .`, see ``flwr_app``) in the simulation engine with 1 CPU per client
    and 1 CPU for Ray (one ClientApp actor); returns the captured output, fails on a
    non-zero exit."""

    def toml_value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    def run(run_config: dict, num_supernodes: int = 3, timeout: int = 420) -> str:
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        cmd = [str(Path(sys.executable).with_name("flwr")), "run", str(flwr_app), "--stream",
               "--run-config", overrides, "--federation-config",
               f"num-supernodes={num_supernodes} client-resources-num-cpus=1 "
               # one Ray actor runs every client in turn: each actor costs a process that
               # imports torch/transformers/peft and loads the model (~10 s of CPU), more
               # than the tiny clients' training; two runs share the 2 cores under xdist
               "init-args-num-cpus=1"]
        t0 = time.time()
        proc = subprocess.run(cmd, env=flwr_env, capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"flwr run failed ({proc.returncode}):\n{out[-6000:]}"
        # `flwr run --stream` exits 0 even when the ServerApp crashes: check it finished
        assert "Summary (" in out or "Nothing to do" in out, \
            f"the ServerApp did not finish:\n{out[-6000:]}"
        print(f"flwr run took {time.time() - t0:.1f}s")
        return out

    return run


@pytest.fixture(scope="session")
def tiny_classification_file(tmp_path_factory):
    """A small 3-topic classification jsonl file (120 rows)."""
    import json

    import numpy as np

    rng = np.random.default_rng(0)
    topics = {"sport": "the team won the match", "business": "shares rose in trading",
              "tech": "a new phone was released"}
    path = tmp_path_factory.mktemp("data") / "topics.jsonl"
    with path.open("w") as f:
        for i in range(120):
            label = list(topics)[i % 3]
            f.write(json.dumps({"text": f"{topics[label]} {rng.integers(1000)}",
                                "label": label}) + "\n")
    return path


# Runs produced once per test session (tiny models, Flower simulation) for the CLI tests
# (tests/cli) and, as the float32 reference, for the wire-dtype test.
CLI_RUN_COMMON = {"test-size": 15, "max-examples": 0, "partitioner": "iid", "batch-size": 4,
                  "max-length": 48, "min-fit-clients": 2, "min-available-clients": 2,
                  "plots": False, "num-server-rounds": 2}
CLI_RUN_SUPERNODES = CLI_RUN_COMMON["min-available-clients"]


@pytest.fixture(scope="session")
def cli_run_configs(tiny_model_dir, tiny_classification_file, tmp_path_factory):
    """``{algorithm: run config}`` of the ``cli_runs`` (without output-dir/run-name)."""
    llama = str(tiny_model_dir("llama"))
    deep = str(build_tiny_model("llama", tmp_path_factory.mktemp("cli-deep") / "deep-llama",
                                num_layers=6))
    configs = {
        "homo": {"algorithm": "homo", "model": llama, "local-steps": 4, "lr": 5e-3,
                 "tracker": "tensorboard"},
        "fedkseed": {"algorithm": "fedkseed", "model": llama, "local-steps": 6,
                     "zo-lr": 1e-3, "zo-eps": 1e-3, "zo-num-seeds": 64},
        "offsite": {"algorithm": "offsite", "model": deep, "local-steps": 3, "lr": 5e-3,
                    "offsite-bottom": 1, "offsite-top": 1, "offsite-emulator-layers": 2},
    }
    return {name: {**CLI_RUN_COMMON, **cfg, "dataset": str(tiny_classification_file)}
            for name, cfg in configs.items()}


@pytest.fixture(scope="session")
def cli_runs(run_flwr, cli_run_configs, tmp_path_factory):
    """``{algorithm: run folder}``: homo (LoRA, tracker=tensorboard), fedkseed and offsite,
    each a real `flwr run` of 2 rounds on 2 simulated SuperNodes."""
    out = tmp_path_factory.mktemp("cli-runs")
    runs = {}
    for name, cfg in cli_run_configs.items():
        run_flwr({**cfg, "output-dir": str(out / "outputs"), "run-name": name},
                 num_supernodes=CLI_RUN_SUPERNODES)
        runs[name] = out / "outputs" / name
    return runs


@pytest.fixture(scope="session")
def execute_notebook(flwr_env):
    """``execute_notebook(name)``: run notebooks/<name> top to bottom with tiny settings
    (``FATELLM_NOTEBOOK_TINY=1``) in a fresh python3 kernel; returns the executed notebook
    and all its text outputs joined.
    The kernel gets the private Flower environment, so `flwr run` cells stay isolated."""
    import nbformat
    from nbclient import NotebookClient

    def run(name: str, timeout: int = 600):
        path = REPO / "notebooks" / name
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, kernel_name="python3", timeout=timeout,
                                resources={"metadata": {"path": str(REPO / "notebooks")}})
        client.execute(env={**flwr_env, "FATELLM_NOTEBOOK_TINY": "1"})
        return nb, notebook_text(nb)

    return run


def notebook_text(nb) -> str:
    """Every text output of an executed notebook, joined (for assertions)."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") or "".join(
                v for k, v in out.get("data", {}).items() if k == "text/plain"))
    return "\n".join(parts)
