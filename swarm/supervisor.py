"""`swarm run`: the supervisor that starts, watches and stops the node and control processes.

Owns the process tree of a running swarm node: the node process
(`python -m swarm.node`, where JAX lives) and the control plane
(`gunicorn -k gevent control.wsgi:app`). Children inherit the resolved settings
through `SWARM_*` environment variables, so every process loads the same config.
Each child's output goes to `<data dir>/logs/<name>.log` and, prefixed, to the
console. A child that dies is restarted with exponential backoff (reset after a
minute of good health); SIGINT/SIGTERM stop everything cleanly; SIGHUP re-reads
the config and passes the signal on (the node updates its limits, gunicorn
restarts its workers, which re-read the config); SIGUSR1 switches the served model
to the one named in `<data dir>/run/serve-model` (the dashboard's wizard writes it):
the node restarts with it at once, and the control plane's workers reload and read it
from `<data dir>/run/active-model`.

Imports no jax.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from swarm.config import Config, ConfigError, ensure_api_key, load_config
from swarm.files import atomic_write_text
from swarm.node_protocol import SOCKET_NAME

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0
STOP_TIMEOUT_S = 10.0
SERVE_REQUEST = Path("run") / "serve-model"
# The model the node serves now, for the control plane's workers: their environment
# is fixed when gunicorn starts, a switch is not.
ACTIVE_MODEL = Path("run") / "active-model"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# The node's compute yields the CPU to the control plane: /health and the first bytes of
# every response stay prompt while all cores decode.
NODE_NICENESS = 10


@dataclass
class Child:
    name: str
    command: list[str]
    log_path: Path
    niceness: int = 0  # added to the supervisor's CPU niceness in the child
    process: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    next_start: float = 0.0
    backoff_s: float = BACKOFF_FIRST_S
    restart_now: bool = False  # stopped on purpose: start again without backoff
    pumps: list[threading.Thread] = field(default_factory=list)


def _pump(stream: IO[bytes], log_file: IO[bytes], prefix: str, echo: bool) -> None:
    for line in iter(stream.readline, b""):
        log_file.write(line)
        log_file.flush()
        if echo:
            sys.stdout.write(f"{prefix} {line.decode(errors='replace')}")
            sys.stdout.flush()
    stream.close()


def _child_setup(niceness: int) -> None:
    """In the child before exec: its own session, so Ctrl-C reaches only the supervisor
    (which stops the children in order), SIGTERM if the supervisor dies, and its CPU
    niceness (the node computes at a lower priority than the HTTP server answers)."""
    os.setsid()
    if niceness:
        with contextlib.suppress(OSError):
            os.nice(niceness)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class Supervisor:
    def __init__(
        self,
        data_dir: Path,
        config: Config,
        *,
        joins: Sequence[str] = (),
        overrides: Mapping[str, object] | None = None,
        echo: bool = True,
        say: Callable[[str], None] = print,
    ):
        self.data_dir = data_dir
        self.config = config
        self.overrides = {key: value for key, value in (overrides or {}).items() if value is not None}
        self.echo = echo
        self.say = say
        self.stopping = threading.Event()
        self.reload_requested = threading.Event()
        self.serve_requested = threading.Event()
        logs = data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        python = sys.executable
        join_args = [arg for code in joins for arg in ("--join", code)]
        self.children = [
            Child(
                "dht", [python, "-m", "swarm.dht", "--data-dir", str(data_dir), *join_args], logs / "dht.log"
            ),
            Child(
                "node",
                [python, "-m", "swarm.node", "--data-dir", str(data_dir)],
                logs / "node.log",
                niceness=NODE_NICENESS,
            ),
            Child(
                "control",
                [
                    python,
                    "-m",
                    "gunicorn",
                    "-c",
                    str(Path(__file__).parent.parent / "control" / "gunicorn_conf.py"),
                    "control.wsgi:app",
                ],
                logs / "control.log",
            ),
        ]

    def environment(self) -> dict[str, str]:
        """The children's environment: the resolved settings, so every process agrees."""
        config = self.config
        env = {key: value for key, value in os.environ.items() if not key.startswith("SWARM_INTERNAL_")}
        env.update(_environment_overrides(self.overrides))
        env.update(
            SWARM_NODE_DATA_DIR=str(self.data_dir),
            SWARM_NODE_MODEL=config.node.model,
            SWARM_NODE_LISTEN_PORT=str(config.node.listen_port),
            SWARM_NODE_HOST=config.node.host,
            SWARM_INTERNAL_BIND=f"{config.node.host}:{config.node.listen_port}",
            SWARM_INTERNAL_WORKERS=str(config.api.workers),
            SWARM_INTERNAL_SUPERVISOR_PID=str(os.getpid()),
            PROMETHEUS_MULTIPROC_DIR=str(self.metrics_dir),
            PYTHONUNBUFFERED="1",
        )
        return env

    @property
    def metrics_dir(self) -> Path:
        return self.data_dir / "run" / "metrics"

    def _start(self, child: Child) -> None:
        log_file = open(child.log_path, "ab")  # noqa: SIM115 - closed by the pump's owner at exit
        child.process = subprocess.Popen(
            child.command,
            env=self.environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=Path(__file__).parent.parent,
            preexec_fn=functools.partial(_child_setup, child.niceness),
        )
        child.started = time.monotonic()
        pump = threading.Thread(
            target=_pump, args=(child.process.stdout, log_file, f"[{child.name}]", self.echo), daemon=True
        )
        pump.start()
        child.pumps.append(pump)

    def _check(self, child: Child) -> None:
        """Restart a child that exited, after its backoff."""
        now = time.monotonic()
        process = child.process
        if process is not None and process.poll() is None:
            if now - child.started > HEALTHY_AFTER_S:
                child.backoff_s = BACKOFF_FIRST_S
            return
        if process is not None and child.restart_now:
            child.process, child.restart_now = None, False
            child.restarts += 1
            self._start(child)
            return
        if process is not None:
            code = process.returncode
            child.process = None
            child.next_start = now + child.backoff_s
            self.say(f"swarm: {child.name} exited with code {code}; restarting in {child.backoff_s:.0f} s")
            child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)
            return
        if now >= child.next_start:
            child.restarts += 1
            self._start(child)

    def reload(self) -> None:
        try:
            self.config = load_config(self.data_dir, os.environ, self.overrides)
        except ConfigError as error:
            self.say(f"swarm: config reload failed, keeping the running config: {error}")
            return
        self.say("swarm: config reloaded")
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGHUP)

    def serve(self) -> None:
        """Restart the node serving the model named in SERVE_REQUEST (a command-line
        model included: the request is the user's newer choice)."""
        request = self.data_dir / SERVE_REQUEST
        try:
            model = request.read_text(encoding="utf-8").strip()
        except OSError as error:
            self.say(f"swarm: no model to switch to: {error}")
            return
        if not model:
            return
        overrides = {**self.overrides, "node.model": model}
        try:
            config = load_config(self.data_dir, os.environ, overrides)
        except ConfigError as error:
            self.say(f"swarm: not switching to {model}: {error}")
            return
        self.overrides, self.config = overrides, config
        request.unlink(missing_ok=True)
        self.say(f"swarm: switching the node to {model}")
        self._write_active_model()
        for child in self.children:
            if child.process is None or child.process.poll() is not None:
                continue
            if child.name == "node":
                child.restart_now = True
                child.process.terminate()
            elif child.name == "control":
                # New workers read ACTIVE_MODEL; the old ones finish their requests first.
                child.process.send_signal(signal.SIGHUP)

    def _write_active_model(self) -> None:
        path = self.data_dir / ACTIVE_MODEL
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.config.node.model + "\n")

    def stop(self) -> None:
        # Control first (stop taking requests), then the node, then the DHT.
        for child in reversed(self.children):
            if child.process is not None and child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()
        for child in self.children:
            for pump in child.pumps:
                pump.join(timeout=2)

    def run(self) -> int:
        config = self.config
        host, port = config.node.host, config.node.listen_port
        if not port_free(host, port):
            self.say(f"swarm: port {port} on {host} is in use; pick another with --port or node.listen_port")
            return 1
        key_file = self.data_dir / "api_key"
        ensure_api_key(self.data_dir, config.api.key)  # before workers fork: one key for all
        base = f"http://{host}:{port}"
        self.say(f"swarm: dashboard {base}/  API {base}/v1  (model {config.node.model})")
        self.say(
            f"swarm: API key: {'config api.key' if config.api.key else key_file}"
            f"  (or from this machine: curl {base}/api/admin/api-key)"
        )
        self.say(f"swarm: logs in {self.data_dir / 'logs'}; Ctrl-C stops")
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.metrics_dir.mkdir(parents=True)
        self._write_active_model()
        (self.data_dir / SOCKET_NAME).unlink(missing_ok=True)
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
        }
        try:
            for child in self.children:
                self._start(child)
            while not self.stopping.wait(0.2):
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self.reload()
                if self.serve_requested.is_set():
                    self.serve_requested.clear()
                    self.serve()
                for child in self.children:
                    self._check(child)
        finally:
            self.say("swarm: stopping")
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested.set()
        elif signum == signal.SIGUSR1:
            self.serve_requested.set()
        else:
            self.stopping.set()


def _environment_overrides(overrides: Mapping[str, object]) -> dict[str, str]:
    """`--set` values as the SWARM_<SECTION>_<KEY> variables every child reads its config from."""
    env = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list | tuple):
            text = ",".join(str(item) for item in value)
        else:
            text = str(value)
        env[f"SWARM_{section}_{name}".upper()] = text
    return env


def run(
    data_dir: Path, environ: Mapping[str, str], overrides: Mapping[str, object], joins: Sequence[str] = ()
) -> int:
    """`swarm run`: joins are invite codes (already checked) the DHT bootstraps from."""
    try:
        config = load_config(data_dir, environ, overrides)
    except ConfigError as error:
        print(f"swarm: {error}")
        return 2
    data_dir.mkdir(parents=True, exist_ok=True)
    return Supervisor(data_dir, config, joins=joins, overrides=overrides).run()


def active_overrides(data_dir: Path) -> dict[str, object]:
    """The settings a switch made after the processes started: {"node.model": ...} while
    a supervisor runs with ACTIVE_MODEL written, else nothing."""
    try:
        model = (data_dir / ACTIVE_MODEL).read_text(encoding="utf-8").strip()
    except OSError:
        return {}
    return {"node.model": model} if model else {}
