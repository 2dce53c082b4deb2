"""Start and stop real Flower processes (SuperLink, SuperNodes, `flwr` CLI) in tests.

Everything a test starts is tracked by pid, together with every process those spawn
(Flower's SuperExec, ``flwr-serverapp`` and per-message ``flwr-clientapp`` processes;
the SuperLink's SuperExec runs in a session of its own, so a process-group kill would
miss it). A background thread samples the descendants, so orphans whose parent already
died are still known. :meth:`ProcessSet.stop_all` terminates them all (SIGTERM, then
SIGKILL after a grace period), checking each pid's start time so a recycled pid is
never touched.

Typical use (see ``tests/test_deployment.py``)::

    with FlowerDeployment(tmp_path) as dep:
        dep.start_superlink()
        dep.start_supernodes(["partition-id=0 num-partitions=2",
                              "partition-id=1 num-partitions=2"])
        result = dep.flwr(["run", ".", dep.connection, "--stream", ...], cwd=repo)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

BIN = Path(sys.executable).parent
# `setpriv --pdeathsig TERM <cmd>` execs <cmd> (same pid) so it gets SIGTERM if the test
# process dies without running its teardown (e.g. SIGKILL); optional.
SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None

# ----------------------------------------------------------------------------- ports


def free_ports(n: int = 1, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- /proc


def _stat(pid: int) -> tuple[int, int] | None:
    """``(ppid, start time in clock ticks)`` of a live pid, None when it is gone/a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # fields after "pid (comm) "
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry))
    return children


def tail(path: Path, n: int = 40) -> str:
    """The last ``n`` lines of a log file ('' when missing)."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# ----------------------------------------------------------------------------- processes


class ProcessSet:
    """Processes started by a test, each logging to its own file, plus their descendants."""

    def __init__(self, log_dir: Path, sample_every: float = 0.5):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.known: dict[int, int] = {}  # pid -> start time, every process we own
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample_loop, args=(sample_every,),
                                         daemon=True)
        self._sampler.start()

    # -- tracking
    def _sample(self) -> None:
        children = _children_map()
        with self._lock:
            stack = list(self.known)
        seen: set[int] = set()
        while stack:
            pid = stack.pop()
            if pid in seen or not self._alive(pid):  # gone, or a recycled pid
                continue
            seen.add(pid)
            for child in children.get(pid, ()):
                st = _stat(child)
                if st is not None:
                    with self._lock:
                        self.known.setdefault(child, st[1])
                    stack.append(child)

    def _sample_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self._sample()
            except Exception:  # noqa: BLE001 - a /proc race must not kill the sampler
                pass

    def _alive(self, pid: int) -> bool:
        st = _stat(pid)
        return st is not None and st[1] == self.known.get(pid)

    # -- starting
    def start(self, name: str, cmd: Sequence[str], env: dict[str, str] | None = None,
              cwd: Path | str | None = None) -> subprocess.Popen:
        """Start ``cmd`` in a new session, stdout+stderr to ``<log_dir>/<name>.log``."""
        if name in self.procs:
            raise ValueError(f"a process named {name!r} was already started")
        log = self.log_dir / f"{name}.log"
        argv = [SETPRIV, "--pdeathsig", "TERM", *cmd] if SETPRIV else list(cmd)
        with open(log, "wb") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                    start_new_session=True)
        st = _stat(proc.pid)
        with self._lock:
            self.procs[name] = proc
            self.logs[name] = log
            if st is not None:
                self.known[proc.pid] = st[1]
        return proc

    def run(self, name: str, cmd: Sequence[str], timeout: float,
            env: dict[str, str] | None = None,
            cwd: Path | str | None = None) -> tuple[int | None, str]:
        """Start ``cmd`` and wait up to ``timeout`` s: ``(return code or None, its log)``.

        On timeout the process (and what it spawned) is stopped and the code is None.
        """
        proc = self.start(name, cmd, env=env, cwd=cwd)
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
            self._sample()
            self._stop_pids([proc.pid, *self._descendants_of(proc.pid)], grace=5)
        return code, self.logs[name].read_text(errors="replace")

    def _descendants_of(self, pid: int) -> list[int]:
        children, out, stack = _children_map(), [], [pid]
        while stack:
            for c in children.get(stack.pop(), ()):
                out.append(c)
                stack.append(c)
        return [p for p in out if p in self.known]

    # -- stopping
    def _signal(self, pids: Sequence[int], sig: int) -> None:
        for pid in pids:
            if self._alive(pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

    def _wait_gone(self, pids: Sequence[int], timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            for p in self.procs.values():
                p.poll()  # reap our direct children so they stop being zombies
            left = [p for p in pids if self._alive(p)]
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.1)

    def _stop_pids(self, pids: Sequence[int], grace: float) -> list[int]:
        self._signal(pids, signal.SIGTERM)
        left = self._wait_gone(pids, grace)
        if left:
            self._signal(left, signal.SIGKILL)
            left = self._wait_gone(left, 5)
        return left

    def stop(self, name: str, grace: float = 10) -> None:
        """Stop one started process (SIGTERM, SIGKILL after ``grace`` s)."""
        self._sample()
        pid = self.procs[name].pid
        self._stop_pids([pid], grace)

    def stop_all(self, grace: float = 10) -> list[int]:
        """Stop everything: the started processes first (so Flower shuts its own children
        down cleanly), then any tracked descendant still alive. Returns pids that
        survived SIGKILL (should be empty)."""
        try:
            self._sample()
        except Exception:  # noqa: BLE001
            pass
        self._stop.set()
        leaders = [p.pid for p in self.procs.values()]
        self._stop_pids(leaders, grace)
        with self._lock:
            rest = [pid for pid in self.known if pid not in leaders]
        left = self._stop_pids(rest, 3)
        for p in self.procs.values():
            p.poll()
        return left

    # -- diagnostics
    def alive(self) -> list[int]:
        with self._lock:
            pids = list(self.known)
        return [pid for pid in pids if self._alive(pid)]

    def tails(self, n: int = 30) -> str:
        return "\n".join(f"----- {name} ({path}) -----\n{tail(path, n)}"
                         for name, path in self.logs.items())


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               diagnostics: Callable[[], str] = lambda: "", every: float = 0.2) -> None:
    """Poll ``predicate`` until true; on timeout raise AssertionError with diagnostics."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n"
                                 f"{diagnostics()}")
        time.sleep(every)


# ----------------------------------------------------------------------------- Flower


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """Environment for Flower processes: private FLWR_HOME, offline, no telemetry, no
    runtime `uv sync`, the venv's bin first on PATH (Flower spawns `flower-superexec`,
    `flwr-serverapp`, `flwr-clientapp` by name)."""
    env = {**os.environ,
           "FLWR_HOME": str(flwr_home),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.update(extra)
    return env


def write_flower_config(flwr_home: Path, name: str, address: str, insecure: bool = True,
                        default: bool = True, root_certificates: Path | None = None) -> Path:
    """``$FLWR_HOME/config.toml`` with one ``[superlink.<name>]`` connection (TLS with
    ``root_certificates`` when not ``insecure``)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    text = f'[superlink]\ndefault = "{name}"\n\n' if default else ""
    text += (f'[superlink.{name}]\naddress = "{address}"\n'
             f"insecure = {'true' if insecure else 'false'}\n")
    if root_certificates is not None:
        text += f'root-certificates = "{root_certificates}"\n'
    path = flwr_home / "config.toml"
    path.write_text(text)
    return path


class FlowerDeployment:
    """A SuperLink + SuperNodes on loopback with a private FLWR_HOME.

    Flower 1.41 serves Fleet, Control and ServerAppIo ("Runtime") APIs over HTTP on a
    single ``--host/--port``; each SuperNode has its own ClientAppIo ("Runtime") port.
    Insecure by default; with ``certs`` (a folder from ``scripts/make_certs.py``: ``ca.crt``,
    ``server.pem``, ``server.key``) every API runs over TLS and the SuperLink only admits
    SuperNodes whose public key was registered with ``flwr supernode register``.
    """

    HOST = "127.0.0.1"

    def __init__(self, workdir: Path, connection: str = "loopback", certs: Path | None = None):
        self.certs = Path(certs) if certs is not None else None
        self.workdir = Path(workdir)
        self.home = self.workdir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.procs = ProcessSet(self.workdir / "logs")
        self.env = flower_env(self.home)
        self.connection = connection
        self.superlink_port: int | None = None
        self.superlink = "superlink"  # name of the running SuperLink process
        self.supernodes: list[str] = []

    def __enter__(self) -> FlowerDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        left = self.procs.stop_all()
        if left:  # pragma: no cover - only when SIGKILL failed
            raise RuntimeError(f"Flower processes survived SIGKILL: {left}")

    @property
    def address(self) -> str:
        return f"{self.HOST}:{self.superlink_port}"

    def diagnostics(self, n: int = 30) -> str:
        return self.procs.tails(n)

    def _check_running(self, name: str) -> None:
        code = self.procs.procs[name].poll()
        if code is not None:
            raise AssertionError(f"{name} exited with code {code}\n{self.diagnostics()}")

    def start_superlink(self, timeout: float = 60, attempts: int = 3) -> None:
        """Start the SuperLink on a free port (retried on a new port if it exits early,
        e.g. when another process took the port first) and write the connection to
        ``$FLWR_HOME/config.toml``."""
        for attempt in range(attempts):
            name = "superlink" if attempt == 0 else f"superlink-retry{attempt}"
            self.superlink_port = free_port(self.HOST)
            proc = self.procs.start(name, [
                str(BIN / "flower-superlink"), *self._superlink_security(),
                "--host", self.HOST, "--port", str(self.superlink_port),
                "--database", str(self.workdir / f"{name}-state.db"),
                "--disable-runtime-dependency-installation",
            ], env=self.env, cwd=self.workdir)

            def up(proc=proc) -> bool:
                return proc.poll() is not None or port_open(self.HOST, self.superlink_port)

            wait_until(up, timeout, f"the SuperLink to listen on {self.address}",
                       self.diagnostics)
            if proc.poll() is None:
                self.superlink = name
                break
        else:
            raise AssertionError(f"the SuperLink exited {attempts} times\n{self.diagnostics()}")
        write_flower_config(self.home, self.connection, self.address,
                            insecure=self.certs is None,
                            root_certificates=self.certs / "ca.crt" if self.certs else None)

    def _superlink_security(self) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        return ["--ssl-certfile", str(self.certs / "server.pem"),
                "--ssl-keyfile", str(self.certs / "server.key"),
                "--ssl-ca-certfile", str(self.certs / "ca.crt"), "--enable-supernode-auth"]

    def _supernode_security(self, key: Path | None) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        out = ["--root-certificates", str(self.certs / "ca.crt")]
        return out + (["--auth-supernode-private-key", str(key)] if key is not None else [])

    def register_supernode(self, public_key: Path, timeout: float = 60) -> int:
        """``flwr supernode register <key.pub> <connection>``; returns the new node id."""
        code, log = self.flwr(["supernode", "register", str(public_key), self.connection,
                               "--format", "json"], timeout=timeout,
                              name=f"flwr-register-{Path(public_key).stem}")
        if code != 0 or "{" not in log:
            raise AssertionError(f"`flwr supernode register` exited {code}:\n{log}")
        return int(json.loads(log[log.index("{"):])["node-id"])

    def start_supernode(self, node_config: str, key: Path | None = None,
                        name: str | None = None) -> str:
        """Start one SuperNode (with its private key when authenticating), not waiting for
        the SuperLink to admit it; returns its process name."""
        name = name or f"supernode-{len(self.supernodes)}"
        self.procs.start(name, [
            str(BIN / "flower-supernode"), *self._supernode_security(key),
            "--superlink", self.address, "--host", self.HOST, "--port",
            str(free_port(self.HOST)), "--node-config", node_config,
        ], env=self.env, cwd=self.workdir)
        return name

    def log_of(self, name: str) -> str:
        return tail(self.procs.logs[name], 10_000)

    def exit_code(self, name: str) -> int | None:
        return self.procs.procs[name].poll()

    def activated_nodes(self) -> int:
        return len(re.findall(r"Activated node_id=\d+",
                              tail(self.procs.logs[self.superlink], 10_000)))

    def start_supernodes(self, node_configs: Sequence[str], timeout: float = 60,
                         keys: Sequence[Path] | None = None) -> None:
        """One SuperNode per node config (and private key, when authenticating); wait until
        the SuperLink activated all of them."""
        before = self.activated_nodes()
        ports = free_ports(len(node_configs), self.HOST)
        keys = list(keys) if keys is not None else [None] * len(node_configs)
        for port, node_config, key in zip(ports, node_configs, keys, strict=True):
            name = f"supernode-{len(self.supernodes)}"
            self.procs.start(name, [
                str(BIN / "flower-supernode"), *self._supernode_security(key),
                "--superlink", self.address, "--host", self.HOST, "--port", str(port),
                "--node-config", node_config,
            ], env=self.env, cwd=self.workdir)
            self.supernodes.append(name)

        def up() -> bool:
            self._check_running(self.superlink)
            for name in self.supernodes:
                self._check_running(name)
            return self.activated_nodes() >= before + len(node_configs)

        wait_until(up, timeout, f"{len(node_configs)} SuperNodes to be activated",
                   self.diagnostics)

    def node_ids(self) -> dict[str, int]:
        """SuperNode name -> node id, from the SuperNodes' logs."""
        ids = {}
        for name in self.supernodes:
            m = re.search(r"SuperNode ID: (\d+)", tail(self.procs.logs[name], 10_000))
            if m:
                ids[name] = int(m.group(1))
        return ids

    def flwr(self, args: Sequence[str], timeout: float, cwd: Path | str | None = None,
             name: str | None = None) -> tuple[int | None, str]:
        """Run the ``flwr`` CLI against this deployment's FLWR_HOME; log kept as ``name``."""
        name = name or f"flwr-{args[0]}-{len(self.procs.procs)}"
        return self.procs.run(name, [str(BIN / "flwr"), *args], timeout=timeout,
                              env=self.env, cwd=cwd or self.workdir)
