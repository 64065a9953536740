"""Admin API for the dashboard and operators: `/api/admin/*`.

Owns the API-key bootstrap (loopback clients only), node stats and models, and the
config routes: read it with every key described, change it (validated as a config
file is, saved to `<data_dir>/config.yaml`), and reload it from disk. Changes apply
at once to the worker that served them; keys marked restart wait for a restart, and
are listed as `restart_needed`. A reload also signals the supervisor (SIGHUP), which
reloads the node and restarts the gunicorn workers, so every worker re-reads the
file. The API key is required like everywhere (control.middleware). Must not import jax.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

# control.app imports this module: reach its accessors through the module, at call time.
from control import app as application
from control.errors import ApiError
from control.middleware import is_loopback, json_body
from control.node_client import NodeError, NodeUnavailable
from swarm.config import (
    Config,
    ConfigError,
    apply_updates,
    describe,
    ensure_api_key,
    load_config,
    restart_keys,
    save_config,
)
from swarm.supervisor import active_overrides

bp = Blueprint("admin", __name__, url_prefix="/api/admin")
log = logging.getLogger("control.admin")

# When this worker started serving (each gunicorn worker imports the app itself).
_STARTED = time.monotonic()


def _restart_needed(config: Config) -> list[str]:
    """Keys whose new values wait for a restart: those that differ from the config at start."""
    return restart_keys(current_app.config["SWARM_AT_START"], config)


def _install(config: Config) -> None:
    """Make `config` the one this worker serves with, including the live-changeable parts."""
    current_app.config["SWARM"] = config
    current_app.config["MAX_CONTENT_LENGTH"] = int(config.api.max_body_mb * 2**20)
    current_app.config["API_KEY"] = ensure_api_key(current_app.config["DATA_DIR"], config.api.key)


def _node_answer(op: str) -> dict[str, Any]:
    """The node's answer to `op`, or a `state: down` record saying why there is none."""
    try:
        return application.node().call(op)
    except (NodeUnavailable, NodeError) as error:
        return {"state": "down", "error": str(error)}


@bp.get("/api-key")
def api_key() -> Response:
    # The dashboard's bootstrap: a page served from this machine fetches the key here.
    # Anyone who can reach this machine's loopback can read <data_dir>/api_key anyway.
    if not is_loopback(request.remote_addr):
        raise ApiError(403, "the API key is only given to clients on this machine (loopback)")
    key = current_app.config["API_KEY"]
    return jsonify({"api_key": key, "header": f"Authorization: Bearer {key}"})


@bp.get("/stats")
def stats() -> Response:
    config = application.settings()
    return jsonify(
        {
            "node": _node_answer("health"),
            "info": _node_answer("info"),
            "control": {"pid": os.getpid(), "uptime_s": round(time.monotonic() - _STARTED, 1)},
            "config": {
                "model": config.node.model,
                "port": config.node.listen_port,
                "workers": config.api.workers,
            },
        }
    )


@bp.get("/models")
def models() -> Response:
    info = application.node().info()  # node down: 503 through the middleware's handler
    state = info.get("state", "unknown")
    return jsonify(
        {
            "models": [{**model, "state": state} for model in info.get("models", [])],
            "network_models": info.get("network_models", []),
        }
    )


@bp.get("/peers")
def peers() -> Response:
    """The peers this node knows (id, DHT address, latency, layers), its DHT and its stage."""
    from swarm.dht_client import DhtClient, DhtError, DhtUnavailable

    dht = DhtClient(current_app.config["DATA_DIR"], timeout=5.0)
    try:
        status, known = dht.status(), dht.peers()
    except (DhtUnavailable, DhtError) as error:
        status, known = {"state": "down", "error": str(error)}, []
    node = _node_answer("info")
    return jsonify(
        {"peers": known, "dht": status, "node": node.get("peering") or {"state": node.get("state")}}
    )


@bp.get("/config")
def get_config() -> Response:
    config = application.settings()
    return jsonify(
        {"config": config.to_dict(), "keys": describe(), "restart_needed": _restart_needed(config)}
    )


def save_updates(updates: Any) -> Config:
    """The running config with `updates` applied, validated (400 naming the key if not),
    saved to config.yaml and served by this worker from now on."""
    try:
        config = apply_updates(application.settings(), updates)
    except ConfigError as error:
        raise ApiError(400, str(error), code="invalid_config") from None
    save_config(current_app.config["DATA_DIR"], config)
    _install(config)
    return config


@bp.put("/config")
def put_config() -> Response:
    updates = json_body()
    config = save_updates(updates)
    log.info("config updated: %s", sorted(updates))
    return jsonify({"config": config.to_dict(), "restart_needed": _restart_needed(config)})


@bp.post("/config/reload")
def reload_config() -> Response:
    try:
        overrides = (
            active_overrides(current_app.config["DATA_DIR"])
            if current_app.config.get("SUPERVISOR_PID")
            else {}
        )
        config = load_config(current_app.config["DATA_DIR"], os.environ, overrides)
    except ConfigError as error:
        raise ApiError(
            400, f"config not reloaded, the running one is kept: {error}", code="invalid_config"
        ) from None
    _install(config)
    signalled = signal_supervisor()
    return jsonify(
        {
            "reloaded": True,
            "supervisor_signalled": signalled,
            "restart_needed": _restart_needed(config),
            "config": config.to_dict(),
        }
    )


def signal_supervisor(signum: int = signal.SIGHUP) -> bool:
    """Signal the supervisor that started us, if any (SIGHUP: it reloads the node and the
    workers; SIGUSR1: it switches the served model); False when there is none to reach."""
    pid = current_app.config.get("SUPERVISOR_PID")
    if not pid:
        return False
    try:
        os.kill(int(pid), signum)
    except (OSError, ValueError) as error:
        log.warning("could not signal the supervisor (pid %s): %s", pid, error)
        return False
    return True
