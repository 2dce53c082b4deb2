"""Execute notebooks at full (real-model) scale and store their outputs in the file.

    python scripts/run_notebook.py notebooks/dp_settings.ipynb [--timeout 7200]

The committed notebooks carry the outputs of such a run, so a reader sees the tables and
plots without running anything; the test suite executes them at tiny scale
(``FATELLM_NOTEBOOK_TINY=1``) in memory and never writes them back. The file is replaced
atomically only after every cell ran; a failing cell leaves the committed notebook as it was.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
         "FLWR_DISABLE_UPDATE_CHECK": "1", "TRANSFORMERS_VERBOSITY": "error",
         "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1",
         "PYTHONWARNINGS": "ignore", "FATELLM_NOTEBOOK_TINY": "0"}


def run(path: Path, timeout: int) -> float:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, kernel_name="python3", timeout=timeout,
                   resources={"metadata": {"path": str(path.parent)}}).execute(
        env={**os.environ, **QUIET})
    seconds = time.perf_counter() - t0
    nb.metadata["fatellm"] = {  # what tests/test_notebooks_committed.py checks
        "scale": "real", "executed": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": round(seconds),
        "command": f"python scripts/run_notebook.py notebooks/{path.name}"}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".ipynb")
    os.close(fd)
    nbformat.write(nb, tmp)
    os.replace(tmp, path)
    return seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--timeout", type=int, default=7200, help="seconds per cell")
    args = p.parse_args(argv)
    for path in args.notebooks:
        if not path.is_file():
            sys.exit(f"no such notebook: {path}")
        print(f"{path}: executed in {run(path.resolve(), args.timeout):.0f}s", flush=True)


if __name__ == "__main__":
    main()
