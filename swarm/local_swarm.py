"""A swarm of full nodes on this machine's loopback, for tests and benchmarks.

Owns `LocalSwarm`: N complete nodes (`swarm run`: supervisor, DHT, node and control
processes), each with its own data dir and free ports, holding the layer ranges of a
split. The model is sharded once (`swarm.shards`); each node's model directory holds hard
links to the shards its layers need plus the embedding's (every node can take requests,
and a requester embeds its own tokens), so a node never has the rest of the model. The first node is every other node's bootstrap
peer; mDNS is off unless asked for (it would find unrelated nodes on the machine).
`tools/local_swarm.py` is its command line; the integration tests drive it directly.

Never imports jax: everything runs in the child processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarm.errors import InvalidRequestError, SwarmError
from swarm.router import even_split

READY_TIMEOUT_S = 600.0


class LocalSwarmError(SwarmError):
    """A node of the local swarm did not start."""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def parse_split(text: str, n_layers: int, nodes: int) -> list[tuple[int, int]]:
    """--split: "auto" (even ranges) or "A-B,C-D,..." (one range per node; any overlap)."""
    if text == "auto":
        return even_split(n_layers, nodes)
    ranges = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        if (
            not sep
            or not first.isdigit()
            or not last.isdigit()
            or not 0 <= int(first) < int(last) <= n_layers
        ):
            raise InvalidRequestError(f"--split part {part!r} is not a range FIRST-LAST within 0-{n_layers}")
        ranges.append((int(first), int(last)))
    if len(ranges) != nodes:
        raise InvalidRequestError(f"--split gives {len(ranges)} ranges for {nodes} nodes")
    return ranges


def layer_count(model_path: Path) -> int:
    from swarm.gguf_file import GGUFFile

    metadata = GGUFFile.open(model_path).metadata
    return int(metadata[f"{metadata['general.architecture']}.block_count"])


@dataclass
class LocalNode:
    name: str
    data_dir: Path
    port: int
    dht_port: int
    peer_port: int
    layers: tuple[int, int]
    network_id: str
    process: subprocess.Popen | None = None
    api_key: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dht(self) -> str:
        return f"127.0.0.1:{self.dht_port}"

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, Any]:
        request = urllib.request.Request(self.api + path, headers={"Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, None
        except (urllib.error.URLError, OSError, ValueError):
            return 0, None

    def node_pid(self) -> int | None:
        """The pid of this node's `swarm.node` process (what holds the layers)."""
        _, body = self.get("/health/ready")
        node = (body or {}).get("node") or {}
        return node.get("pid")

    def pids(self) -> list[int]:
        import psutil

        if self.process is None:
            return []
        try:
            parent = psutil.Process(self.process.pid)
            return [parent.pid, *(child.pid for child in parent.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "api": self.api,
            "api_key": self.api_key,
            "layers": list(self.layers),
            "dht": self.dht,
            "data_dir": str(self.data_dir),
            "pids": self.pids(),
        }


class LocalSwarm:
    """Starts and stops full nodes on loopback; use as a context manager."""

    def __init__(
        self,
        root: Path,
        model_path: Path,
        *,
        model_id: str,
        network_id: str = "swarm-local",
        mdns: bool = False,
        env: dict[str, str] | None = None,
        echo: bool = False,
    ) -> None:
        self.root = Path(root)
        self.model_path = Path(model_path)
        self.model_id = model_id
        self.network_id = network_id
        self.mdns = mdns
        self.env = env or {}
        self.echo = echo
        self.nodes: list[LocalNode] = []
        self.n_layers = layer_count(self.model_path)
        self._manifest: Any = None

    def _model_dir(self, data_dir: Path, layers: tuple[int, int]) -> Path:
        """`data_dir/models/<model id>/`: the manifest, the header and this node's shards, hard-linked."""
        from swarm.shards import EMBEDDING, MIB, link_shards, select_shards, split_gguf

        shards = self.root / "shards"
        if self._manifest is None:
            size_mb = max(self.model_path.stat().st_size / (2 * self.n_layers) / MIB, 0.001)
            self._manifest = split_gguf(self.model_path, shards, shard_size_mb=size_mb)
        manifest = self._manifest
        chosen = set(select_shards(manifest, layers)) | {manifest.holders(EMBEDDING)[0][0]}
        return link_shards(shards, sorted(chosen), data_dir / "models" / self.model_id)

    def add(
        self,
        layers: tuple[int, int] | None = None,
        *,
        name: str | None = None,
        join: str | None = None,
        network_id: str | None = None,
        bootstrap: bool = True,
        env: dict[str, str] | None = None,
    ) -> LocalNode:
        """Starts one more node (not waiting for it); it bootstraps from the first node
        unless `join` (an invite code) or `bootstrap=False` says otherwise. `env` adds
        settings (SWARM_* variables) for this node only."""
        name = name or f"node{len(self.nodes)}"
        data_dir = self.root / name
        layers = layers or (0, self.n_layers)
        model_dir = self._model_dir(data_dir, layers)
        node = LocalNode(
            name,
            data_dir,
            free_port(),
            free_port(socket.SOCK_DGRAM),
            free_port(),
            layers,
            network_id or self.network_id,
        )
        node_env = env
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWARM_")}
        env.update(
            SWARM_NODE_LAYERS="" if layers == (0, self.n_layers) else f"{layers[0]}-{layers[1]}",
            SWARM_NETWORK_DHT_PORT=str(node.dht_port),
            SWARM_NETWORK_PEER_PORT=str(node.peer_port),
            SWARM_NETWORK_LISTEN_ADDRESS="127.0.0.1",
            SWARM_NETWORK_ENABLE_MDNS="true" if self.mdns else "false",
            SWARM_NETWORK_GOSSIP_NETWORK_ID=node.network_id,
        )
        if bootstrap and not join and self.nodes:
            env["SWARM_NETWORK_BOOTSTRAP_PEERS"] = self.nodes[0].dht
        env.update(self.env)
        env.update(node_env or {})
        command = [sys.executable, "-m", "swarm", "run", str(model_dir), "--data-dir", str(data_dir)]
        command += ["--port", str(node.port)]
        if join:
            command += ["--join", join]
        log = open(data_dir / "supervisor.log", "ab")  # noqa: SIM115 - the child holds it
        node.process = subprocess.Popen(
            command,
            stdout=None if self.echo else log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        log.close()
        self.nodes.append(node)
        return node

    def wait_ready(self, nodes: list[LocalNode] | None = None, timeout: float = READY_TIMEOUT_S) -> None:
        """Waits until every node's model is loaded and its API key readable."""
        deadline = time.monotonic() + timeout
        for node in nodes or self.nodes:
            while True:
                key_file = node.data_dir / "api_key"
                if key_file.exists():
                    node.api_key = key_file.read_text().strip()
                status, _ = node.get("/health/ready", timeout=5)
                if status == 200 and node.api_key:
                    break
                if node.process is not None and node.process.poll() is not None:
                    raise LocalSwarmError(f"{node.name} exited: see {node.data_dir / 'supervisor.log'}")
                if time.monotonic() > deadline:
                    raise LocalSwarmError(f"{node.name} was not ready in {timeout:.0f} s")
                time.sleep(0.5)

    def invite(self, node: LocalNode, timeout: float = 30.0) -> str:
        from swarm.dht_client import DhtClient, DhtError, DhtUnavailable

        deadline = time.monotonic() + timeout
        while True:
            try:
                return DhtClient(node.data_dir).invite()
            except (DhtUnavailable, DhtError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop_node(self, node: LocalNode) -> None:
        """Stops the node's supervisor, then kills any of its processes left behind."""
        import psutil

        process = node.process
        if process is None or process.poll() is not None:
            return
        leftover = node.pids()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # The supervisor's children live in their own sessions: make sure none is left.
        for pid in leftover:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()

    def stop(self) -> None:
        for node in self.nodes:
            self.stop_node(node)

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    from swarm.models import resolve_model
    from swarm.paths import data_dir as default_data_dir

    parser = argparse.ArgumentParser(
        prog="tools/local_swarm.py", description="start N full swarm nodes on loopback; Ctrl-C stops them all"
    )
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--split", default="auto", help='"auto" or FIRST-LAST,... (one range per node)')
    parser.add_argument("--network-id", default="swarm-local")
    parser.add_argument("--root", help="directory for the nodes' data dirs (default: a temporary one)")
    parser.add_argument("--mdns", action="store_true", help="also find each other over mDNS on loopback")
    parser.add_argument("--echo", action="store_true", help="show the nodes' logs on this terminal")
    args = parser.parse_args(argv)
    model_path = resolve_model(args.model, default_data_dir(os.environ))
    model_id = args.model if "/" not in args.model else model_path.stem
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="swarm-local-"))
    swarm = LocalSwarm(
        root, model_path, model_id=model_id, network_id=args.network_id, mdns=args.mdns, echo=args.echo
    )

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        with swarm:
            for layers in parse_split(args.split, swarm.n_layers, args.nodes):
                swarm.add(layers)
            swarm.wait_ready()
            for node in swarm.nodes:
                print(json.dumps(node.describe()), flush=True)
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        return 0
    except (SwarmError, OSError) as error:
        print(f"local_swarm: {error}", file=sys.stderr)
        return 1
