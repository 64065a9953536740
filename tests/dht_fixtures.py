"""DHT processes on loopback for tests: start `python -m swarm.dht` with a config from the
environment, wait until it listens, talk to it through `DhtClient`, and always stop it.

Every process binds 127.0.0.1 only; mDNS is off unless a test turns it on (and then it is
pinned to 127.0.0.1 by the listen address), so no test traffic leaves loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from swarm.dht_client import SOCKET_NAME, STATE_FILE, DhtClient

REPO = Path(__file__).resolve().parent.parent


def new_network_id() -> str:
    """A network id no other test run (or session on this machine) uses."""
    return f"test-{secrets.token_hex(4)}"


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """The first truthy result of `condition()`, polled until `timeout` seconds; fails the test after."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class DhtProcess:
    """One DHT process with its own data dir."""

    def __init__(
        self,
        data_dir: Path,
        network_id: str,
        *,
        bootstrap: Sequence[str] = (),
        join: Sequence[str] = (),
        mdns: bool = False,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.network_id = network_id
        data_dir.mkdir(parents=True, exist_ok=True)
        environment = {name: value for name, value in os.environ.items() if not name.startswith("SWARM_")}
        environment.update(
            SWARM_NETWORK_LISTEN_ADDRESS="127.0.0.1",
            SWARM_NETWORK_GOSSIP_NETWORK_ID=network_id,
            SWARM_NETWORK_ENABLE_MDNS="true" if mdns else "false",
            SWARM_NETWORK_BOOTSTRAP_PEERS=",".join(bootstrap),
            **(settings or {}),
        )
        command = [sys.executable, "-m", "swarm.dht", "--data-dir", str(data_dir)]
        for code in join:
            command += ["--join", code]
        self.log_path = data_dir / "dht.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=environment, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self.client = DhtClient(data_dir, timeout=10.0)
        self.address = ""
        self.peer_id = ""

    def ready(self) -> bool:
        """Whether the process listens (its state file names it); fails the test if it died."""
        if self.process.poll() is not None:
            pytest.fail(f"DHT process exited with {self.process.returncode}:\n{self.log()}")
        try:
            state = json.loads((self.data_dir / STATE_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return False
        if state.get("pid") != self.process.pid or not (self.data_dir / SOCKET_NAME).exists():
            return False
        self.address, self.peer_id = state["dht"], state["peer_id"]
        return True

    def wait_ready(self, timeout: float = 30.0) -> DhtProcess:
        wait_for(self.ready, timeout, f"the DHT process in {self.data_dir} to listen")
        return self

    def wait_contacts(self, count: int, timeout: float = 15.0) -> DhtProcess:
        """Waits until the routing table holds at least `count` contacts (bootstrap runs in the
        background after the process starts listening)."""
        wait_for(lambda: self.client.status()["contacts"] >= count, timeout, f"{count} DHT contacts")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def peer_ids(self) -> set[str]:
        return {peer["peer_id"] for peer in self.client.peers()}

    def stop(self) -> int:
        """Stops the process (SIGTERM, then SIGKILL after 10 s); returns its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


class DhtCluster:
    """Starts DHT processes under one directory and stops all of them at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.processes: list[DhtProcess] = []

    def start(self, network_id: str, *, wait: bool = True, **options: Any) -> DhtProcess:
        process = DhtProcess(self.root / f"node{len(self.processes)}", network_id, **options)
        self.processes.append(process)
        return process.wait_ready() if wait else process

    def stop_all(self) -> None:
        for process in self.processes:
            if process.process.poll() is None:
                process.process.send_signal(signal.SIGTERM)
        for process in self.processes:
            process.stop()


@contextlib.contextmanager
def dht_cluster(root: Path) -> Iterator[DhtCluster]:
    """A `DhtCluster` whose processes are all stopped when the block ends."""
    cluster = DhtCluster(root)
    try:
        yield cluster
    finally:
        cluster.stop_all()
