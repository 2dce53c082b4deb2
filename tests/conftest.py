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
def run_flwr(flwr_env):
    """``run_flwr(run_config: dict, num_supernodes=3)``: `flwr run .` in the simulation
    engine with 1 CPU per client; returns the captured output, fails on a non-zero exit."""

    def toml_value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    def run(run_config: dict, num_supernodes: int = 3, timeout: int = 420) -> str:
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        cmd = [str(Path(sys.executable).with_name("flwr")), "run", str(REPO), "--stream",
               "--run-config", overrides, "--federation-config",
               f"num-supernodes={num_supernodes} client-resources-num-cpus=1"]
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
