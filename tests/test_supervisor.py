"""The supervisor's model switch (SIGUSR1 with `run/serve-model`), with stand-in children
that record the model they were started with."""

from __future__ import annotations

import sys
import time

from swarm.config import load_config
from swarm.supervisor import SERVE_REQUEST, Supervisor, active_overrides


def _stand_in(record) -> list[str]:
    script = (
        "import os, sys, time\n"
        f"with open({str(record)!r}, 'a') as f: f.write(os.environ['SWARM_NODE_MODEL'] + '\\n')\n"
        "time.sleep(120)\n"
    )
    return [sys.executable, "-c", script]


def _lines(path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_switching_restarts_the_node_with_the_new_model(tmp_path):
    said: list[str] = []
    config = load_config(tmp_path, {}, {"node.model": "smollm2-135m"})
    supervisor = Supervisor(
        tmp_path, config, overrides={"node.model": "smollm2-135m"}, echo=False, say=said.append
    )
    records = {child.name: tmp_path / f"{child.name}.models" for child in supervisor.children}
    for child in supervisor.children:
        child.command = _stand_in(records[child.name])
    try:
        for child in supervisor.children:
            supervisor._start(child)
        deadline = time.monotonic() + 30
        while any(not _lines(path) for path in records.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_lines(path) == ["smollm2-135m"] for path in records.values())

        (tmp_path / SERVE_REQUEST).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / SERVE_REQUEST).write_text("gemma3-270m\n")
        supervisor.serve()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_lines(records["node"])) < 2:
            for child in supervisor.children:
                supervisor._check(child)
            time.sleep(0.05)
        assert _lines(records["node"]) == ["smollm2-135m", "gemma3-270m"]
        # The DHT keeps running; the control plane is told to reload (gunicorn restarts
        # its workers on SIGHUP, here the stand-in dies of it), and the workers read:
        assert _lines(records["dht"]) == ["smollm2-135m"]
        assert active_overrides(tmp_path) == {"node.model": "gemma3-270m"}
        assert supervisor.config.node.model == "gemma3-270m"
        assert not (tmp_path / SERVE_REQUEST).exists()
        assert not any("node exited" in line for line in said)  # no crash backoff
    finally:
        supervisor.stop()


def test_a_switch_to_an_invalid_setting_keeps_the_running_model(tmp_path):
    said: list[str] = []
    config = load_config(tmp_path, {}, {"node.model": "smollm2-135m"})
    supervisor = Supervisor(tmp_path, config, echo=False, say=said.append)
    (tmp_path / "config.yaml").write_text("api:\n  rate_limit_rpm: -3\n")
    (tmp_path / SERVE_REQUEST).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / SERVE_REQUEST).write_text("gemma3-270m\n")
    supervisor.serve()
    assert supervisor.config.node.model == "smollm2-135m"
    assert any("not switching to gemma3-270m" in line for line in said)
