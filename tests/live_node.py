"""One `swarm run` on loopback ports of its own, for the tests that drive the whole
product (tests/test_live_api.py, tests/test_browser.py): started as its own process
group with a clean `SWARM_*` environment plus the given settings, no mDNS, and stopped
with SIGTERM (the group killed if anything is left)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from swarm.local_swarm import free_port

MODEL = "smollm2-135m"
# Asked bare, SmolLM2's greedy answer turns on activation rounding: llama.cpp and our CPU
# kernel (both 8-bit) list places, f32 says Paris. Asked for a sentence, all say Paris.
CAPITAL_QUESTION = "What is the capital of France? Answer in one sentence."


class LiveNode:
    def __init__(
        self, data_dir: Path, env: dict[str, str], network_id: str = "swarm-live-test", model: str = MODEL
    ):
        self.data_dir = data_dir
        self.model = model
        self.port = free_port()
        self.dht_port = free_port(socket.SOCK_DGRAM)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / "supervisor.log"
        self.key = ""
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SWARM_")},
            "SWARM_NETWORK_ENABLE_MDNS": "false",
            "SWARM_NETWORK_LISTEN_ADDRESS": "127.0.0.1",
            "SWARM_NETWORK_DHT_PORT": str(self.dht_port),
            "SWARM_NETWORK_PEER_PORT": str(free_port()),
            "SWARM_NETWORK_GOSSIP_NETWORK_ID": network_id,
            **env,
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Starts it from a config of defaults (a persistent data dir keeps its compile cache)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for leftover in ("config.yaml", "pins.json"):
            (self.data_dir / leftover).unlink(missing_ok=True)
        command = [sys.executable, "-m", "swarm", "run", self.model, "--data-dir", str(self.data_dir)]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
            )

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            with contextlib.suppress(httpx2.HTTPError):
                if httpx2.get(f"{self.base}/health/ready", timeout=2).status_code == 200:
                    self.key = (self.data_dir / "api_key").read_text().strip()
                    return
            time.sleep(0.5)
        pytest.fail(f"{self.data_dir.name} not ready in {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def get(self, path: str) -> dict:
        reply = httpx2.get(self.base + path, headers=self.headers(), timeout=10)
        reply.raise_for_status()
        return reply.json()

    @property
    def peer_id(self) -> str:
        return json.loads((self.data_dir / "dht.json").read_text())["peer_id"]

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
