"""JSON for the dashboard's pages that no other API gives: `/api/dashboard/*`.

Owns the routes behind the setup wizard (this machine's hardware), the models page
(catalog with layers here and at peers, shards and what is missing, pins, pulls), the
network map (a snapshot, and the same as a server-sent event stream) and the credits
page (balance, tier, receipts, leaderboard), and switching the served model (the supervisor
restarts the node with it). Everything comes from the node (through the app's node
client), the DHT process (through `swarm.dht_client`) or the data dir; nothing is
made up. The API key is required as on every /api route (control.middleware). Must
not import jax.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from control import admin, credits_api, hardware, model_catalog, model_pulls

# control.app imports this module: reach its accessors through the module, at call time.
from control import app as application
from control.errors import ApiError
from control.middleware import json_body
from control.node_client import NodeError, NodeUnavailable
from control.sse import KEEPALIVE_FRAME, event_frame, event_stream
from swarm.dht_client import DhtClient, DhtError, DhtUnavailable
from swarm.models import REGISTRY
from swarm.supervisor import SERVE_REQUEST

bp = Blueprint("dashboard_api", __name__, url_prefix="/api/dashboard")

DHT_TIMEOUT_S = 3.0
# The network stream sends a snapshot this often, and ends after STREAM_S so that no
# worker is held by a forgotten tab (the page reconnects when it is still open).
STREAM_INTERVAL_S = 2.0
STREAM_S = 300.0
# DESIGN.md §9: a node's balance sets its priority tier.
TIERS = (
    {"id": "platinum", "rule": "top_percent", "percent": 10},
    {"id": "gold", "rule": "top_percent", "percent": 30},
    {"id": "silver", "rule": "positive"},
    {"id": "bronze", "rule": "zero_or_negative"},
)


def _node_info() -> dict[str, Any]:
    try:
        return application.node().info()
    except (NodeUnavailable, NodeError) as error:
        return {"state": "down", "error": str(error), "models": []}


def _dht(model_ids: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The DHT's status and its contacts (other peers), each with the records it publishes
    for `model_ids` (looked up now, so layer ranges are current), or a `state: down`
    status and no peers."""
    client = DhtClient(current_app.config["DATA_DIR"], timeout=DHT_TIMEOUT_S)
    try:
        status, contacts = client.status(), client.peers()
        found = [record for model_id in model_ids for record in client.lookup(model_id)]
    except (DhtUnavailable, DhtError) as error:
        return {"state": "down", "error": str(error)}, []
    network_id = status.get("network_id")
    peers = {str(peer["peer_id"]): {**peer, "records": list(peer.get("records") or [])} for peer in contacts}
    for record in found:
        if record.peer_id == status.get("peer_id") or not record.valid(str(network_id)):
            continue  # this node's own record, or one that does not check out
        peer = peers.setdefault(
            record.peer_id,
            {
                "peer_id": record.peer_id,
                "dht": record.dht,
                "latency_ms": None,
                "last_seen": None,
                "source": "record",
                "network_id": record.network_id,
                "verified": True,
                "records": [],
            },
        )
        entry = {
            "model_id": record.model_id,
            "layers": list(record.layers),
            "address": record.address,
            "n_layers": record.n_layers,
            "throughput": record.throughput,
            "load": record.load,
        }
        peer["records"] = [
            known
            for known in peer["records"]
            if (known.get("model_id"), known.get("layers")) != (entry["model_id"], entry["layers"])
        ] + [entry]
    return status, list(peers.values())


def _served_ids(info: dict[str, Any]) -> list[str]:
    return [str(model["id"]) for model in info.get("models", []) if model.get("id")]


@bp.get("/hardware")
def get_hardware() -> Response:
    return jsonify(hardware.detect(current_app.config["DATA_DIR"]))


@bp.get("/models")
def get_models() -> Response:
    data_dir = current_app.config["DATA_DIR"]
    info = _node_info()
    served = _served_ids(info)
    _, peers = _dht(served)
    candidates = dict.fromkeys([*REGISTRY, *served])
    models_dir = data_dir / "models"
    if models_dir.is_dir():
        candidates.update(dict.fromkeys(path.name for path in models_dir.iterdir() if path.is_dir()))
    disk = {model_id: model_catalog.local_model(model_id, data_dir) for model_id in candidates}
    entries = model_catalog.catalog(
        info, peers, disk, model_pulls.pins(data_dir), model_pulls.all_statuses(data_dir)
    )
    # What this node serves first, then what is on disk, then what peers announce.
    entries.sort(key=lambda entry: (not entry["served"], not entry["installed"]))
    return jsonify({"models": entries, "node": {"state": info.get("state"), "error": info.get("error")}})


@bp.put("/models/<path:model_id>/pin")
def pin(model_id: str) -> Response:
    """Pins a model (kept on this machine); one that can be pulled and is not here yet
    starts downloading at once, its status in `pull` (null when nothing was started)."""
    data_dir = current_app.config["DATA_DIR"]
    pinned = model_pulls.set_pinned(data_dir, model_id, True)
    started = None
    running = (model_pulls.status(data_dir, model_id) or {}).get("state") == "running"
    if (
        model_pulls.pullable(model_id)
        and not running
        and not model_catalog.local_model(model_id, data_dir)["installed"]
    ):
        started = model_pulls.start(data_dir, model_id)
    return jsonify({"pinned": pinned, "pull": started})


@bp.delete("/models/<path:model_id>/pin")
def unpin(model_id: str) -> Response:
    return jsonify({"pinned": model_pulls.set_pinned(current_app.config["DATA_DIR"], model_id, False)})


@bp.post("/models/<path:model_id>/pull")
def pull(model_id: str) -> tuple[Response, int]:
    try:
        started = model_pulls.start(current_app.config["DATA_DIR"], model_id)
    except model_pulls.PullError as error:
        running = "already" in str(error)
        raise ApiError(409 if running else 400, str(error), code="pull_refused") from None
    return jsonify(started), 202


@bp.get("/models/<path:model_id>/pull")
def pull_status(model_id: str) -> Response:
    current = model_pulls.status(current_app.config["DATA_DIR"], model_id)
    if current is None:
        raise ApiError(404, f"no pull of {model_id!r} was started", code="not_found")
    return jsonify(current)


@bp.put("/serve")
def serve() -> tuple[Response, int]:
    """Serve another model: `{"model": ID}`, a registered or installed one. Saved as
    node.model (so later starts keep it) and handed to the supervisor, which restarts
    the node with it; the answer comes before the restart, and /health/ready names the
    model once it is loaded."""
    body = json_body()
    model_id = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model_id, str) or not model_id:
        raise ApiError(400, 'give the model to serve as {"model": ID}', code="invalid_request")
    data_dir = current_app.config["DATA_DIR"]
    if model_id not in REGISTRY and not model_catalog.local_model(model_id, data_dir)["installed"]:
        known = ", ".join(sorted(REGISTRY))
        raise ApiError(
            400,
            f"unknown model {model_id!r}: pick a registered ({known}) or installed one",
            code="unknown_model",
        )
    if not current_app.config.get("SUPERVISOR_PID"):
        raise ApiError(
            409,
            "this control plane was not started by `swarm run`: restart the node with the model",
            code="no_supervisor",
        )
    admin.save_updates({"node": {"model": model_id}})
    request_file = data_dir / SERVE_REQUEST
    request_file.parent.mkdir(parents=True, exist_ok=True)
    request_file.write_text(model_id + "\n", encoding="utf-8")
    if not admin.signal_supervisor(signal.SIGUSR1):
        request_file.unlink(missing_ok=True)
        raise ApiError(
            503, "could not reach the supervisor: see the control plane's log", code="no_supervisor"
        )
    return jsonify({"model": model_id, "switching": True}), 202


def network_snapshot() -> dict[str, Any]:
    """This node (peer id, model, layers, stage) and every DHT contact with its layers and latency."""
    info = _node_info()
    status, peers = _dht(_served_ids(info))
    peering = info.get("peering") or {}
    model = next(iter(info.get("models") or []), {})
    stage = peering.get("stage") or {}
    return {
        "time": time.time(),
        "self": {
            "peer_id": peering.get("peer_id") or status.get("peer_id"),
            "network_id": peering.get("network_id") or status.get("network_id"),
            "state": info.get("state"),
            "model_id": model.get("id"),
            "n_layers": model.get("n_layers"),
            "layers": stage.get("layers") or model.get("layers"),
            "stage_address": stage.get("address"),
            "dht": status.get("dht"),
            "throughput_layers_s": peering.get("throughput_layers_s"),
        },
        "dht": status,
        "peers": peers,
    }


@bp.get("/network")
def get_network() -> Response:
    return jsonify(network_snapshot())


@bp.get("/network/stream")
def network_stream() -> Response:
    """`event: network` with a snapshot at once, then every STREAM_INTERVAL_S, for STREAM_S."""
    # Read inside the request: the stream's generator runs after the request context is gone.
    app = current_app._get_current_object()  # type: ignore[attr-defined]

    def frames() -> Iterator[str]:
        ends = time.monotonic() + STREAM_S
        while True:
            with app.app_context():
                yield event_frame("network", network_snapshot())
            if time.monotonic() >= ends:
                yield event_frame("end", {"reconnect": True})
                return
            time.sleep(STREAM_INTERVAL_S)
            yield KEEPALIVE_FRAME

    return event_stream(frames(), on_close=lambda: None)


@bp.get("/credits")
def credits() -> Response:
    """This node's balance, standing, tier and recent receipts, the known peers' standings
    (the leaderboard) and the tier rules."""
    return jsonify({"active": True, **credits_api.credits_state(recent=20, board=20), "tiers": list(TIERS)})
