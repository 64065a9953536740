"""The pool API (`/api/pool/*`) over the mock node: create, invite, join a real owner's stage,
remove, leave, private mode, and the 400s for malformed bodies."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import yaml

from control import admin
from swarm.config import load_config
from swarm.identity import Identity
from swarm.pool import Invitation, PoolStore
from swarm.pool_desk import fetch_state
from tests.test_pool_desk import load_stage_engine, pool_stage

NETWORK = "swarm-pool-api-test"


@pytest.fixture(scope="module")
def stage_engine(tiny_model, data_dir):
    return load_stage_engine(tiny_model, data_dir)


@pytest.fixture
def control_overrides() -> dict:
    return {"api.rate_limit_rpm": 0, "api.rate_limit_admin_rpm": 0, "network.gossip_network_id": NETWORK}


def _error(response: httpx2.Response, status: int) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert message and "\n" not in message
    return message


def _serving(monkeypatch, mock_backend, address: str) -> None:
    """Makes the mock node report a peer stage at `address`, as a node in a network does."""
    info = mock_backend.info()
    peering = {"peer_id": "x", "network_id": NETWORK, "stage": {"address": address, "layers": [0, 2]}}
    monkeypatch.setattr(mock_backend, "info", lambda: {**info, "peering": peering})


@pytest.fixture
def device(tmp_path: Path, control_overrides) -> Iterator[tuple[httpx2.Client, Path]]:
    """A second node's control plane (no node process: joining needs none), and its data dir."""
    from control.app import create_app

    data_dir = tmp_path / "device"
    data_dir.mkdir()
    app = create_app(load_config(data_dir, {}, control_overrides), data_dir)
    app.testing = True
    transport = httpx2.WSGITransport(app=app, remote_addr="127.0.0.1")
    headers = {"Authorization": f"Bearer {app.config['API_KEY']}"}
    with httpx2.Client(transport=transport, base_url="http://127.0.0.1", headers=headers) as client:
        yield client, data_dir


def test_the_api_key_is_required(http):
    assert http.get("/api/pool/state", headers={"Authorization": ""}).status_code == 401


def test_a_new_node_is_in_no_pool_until_it_creates_one(http, control_app):
    state = http.get("/api/pool/state").json()
    me = Identity.load_or_create(control_app.config["DATA_DIR"]).peer_id
    assert state == {
        "pool": None,
        "role": None,
        "removed": False,
        "peer_id": me,
        "invitations": [],
        "private_mode": False,
        "private_mode_allow_lan": True,
        "offline_mode": False,
        "max_pool_size": 10,
    }
    created = http.post("/api/pool", json={"name": "home lab", "device_name": "desktop"})
    assert created.status_code == 201
    assert created.json() == http.get("/api/pool/state").json()
    pool = created.json()["pool"]
    assert created.json()["role"] == "owner" and pool["name"] == "home lab" and pool["pool_id"] == me
    assert pool["version"] == 1
    assert [{k: m[k] for k in ("peer_id", "device_name", "owner", "self")} for m in pool["members"]] == [
        {"peer_id": me, "device_name": "desktop", "owner": True, "self": True}
    ]
    assert "already in pool 'home lab'" in _error(http.post("/api/pool", json={"name": "again"}), 409)


def test_an_invitation_needs_the_node_in_a_network_and_names_its_stage(http, mock_backend, monkeypatch):
    assert "in no pool" in _error(http.post("/api/pool/invitations"), 409)
    http.post("/api/pool", json={"name": "home lab"})
    assert "not serving in a network" in _error(http.post("/api/pool/invitations"), 409)

    _serving(monkeypatch, mock_backend, "127.0.0.1:45678")
    answer = http.post("/api/pool/invitations", json={"device_name": "laptop"})
    assert answer.status_code == 201
    body = answer.json()
    invitation = Invitation.from_code(body["code"])
    invitation.verify()
    me = http.get("/api/pool/state").json()["peer_id"]
    assert (invitation.pool_id, invitation.pool_name, invitation.device_name) == (me, "home lab", "laptop")
    assert (invitation.owner_address, invitation.network_id) == ("127.0.0.1:45678", NETWORK)
    assert body["invitation_id"] == invitation.invitation_id and body["expires"] == invitation.expires
    assert abs(invitation.expires - time.time() - 24 * 3600) < 60  # pool.invitation_ttl_hours
    assert "only devices on this machine" in body["warning"]
    listed = http.get("/api/pool/state").json()["invitations"]
    assert listed == [
        {
            "invitation_id": invitation.invitation_id,
            "device_name": "laptop",
            "expires": invitation.expires,
            "code": body["code"],
        }
    ]
    assert http.delete(f"/api/pool/invitations/{invitation.invitation_id}").status_code == 204
    assert http.get("/api/pool/state").json()["invitations"] == []
    _error(http.delete(f"/api/pool/invitations/{invitation.invitation_id}"), 404)


def test_a_wildcard_stage_address_is_replaced_by_a_reachable_one(http, mock_backend, monkeypatch):
    http.post("/api/pool", json={"name": "home lab"})
    _serving(monkeypatch, mock_backend, "0.0.0.0:45678")
    code = http.post("/api/pool/invitations").json()["code"]
    host, _, port = Invitation.from_code(code).owner_address.rpartition(":")
    assert host not in ("0.0.0.0", "") and port == "45678"


def test_at_most_five_invitations_are_open(http, mock_backend, monkeypatch):
    http.post("/api/pool", json={"name": "home lab"})
    _serving(monkeypatch, mock_backend, "127.0.0.1:45678")
    for _ in range(5):
        assert http.post("/api/pool/invitations").status_code == 201
    assert "invitations are open already" in _error(http.post("/api/pool/invitations"), 409)


def test_a_device_joins_is_listed_removed_and_sees_itself_removed(
    http, control_app, mock_backend, monkeypatch, device, stage_engine
):
    owner_dir = control_app.config["DATA_DIR"]
    owner = Identity.load_or_create(owner_dir)
    device_http, device_dir = device
    laptop = Identity.load_or_create(device_dir)
    http.post("/api/pool", json={"name": "home lab", "device_name": "desktop"})
    with pool_stage(stage_engine, PoolStore(owner_dir), owner, NETWORK) as stage:
        _serving(monkeypatch, mock_backend, stage.address)
        code = http.post("/api/pool/invitations").json()["code"]
        joined = device_http.post("/api/pool/join", json={"code": code, "device_name": "laptop"})
        assert joined.status_code == 200, joined.text
        assert joined.json()["role"] == "member" and not joined.json()["removed"]
        assert [m["device_name"] for m in joined.json()["pool"]["members"]] == ["desktop", "laptop"]

        members = http.get("/api/pool/state").json()["pool"]["members"]
        assert [(m["peer_id"], m["owner"], m["self"]) for m in members] == [
            (owner.peer_id, True, True),
            (laptop.peer_id, False, False),
        ]
        # A member can neither invite nor remove; the owner cannot join elsewhere while it has members.
        assert "only the owner" in _error(device_http.post("/api/pool/invitations"), 403)
        _error(device_http.delete(f"/api/pool/members/{owner.peer_id}"), 403)
        assert "remove them or leave" in _error(http.post("/api/pool/join", json={"code": code}), 409)
        assert "cannot remove itself" in _error(http.delete(f"/api/pool/members/{owner.peer_id}"), 400)

        removed = http.delete(f"/api/pool/members/{laptop.peer_id}")
        assert removed.status_code == 200
        assert [m["peer_id"] for m in removed.json()["pool"]["members"]] == [owner.peer_id]
        _error(http.delete(f"/api/pool/members/{laptop.peer_id}"), 404)

        device_store = PoolStore(device_dir)
        device_store.save(fetch_state(laptop, NETWORK, stage.address, device_store.state()))
    seen = device_http.get("/api/pool/state").json()
    assert seen["role"] is None and seen["removed"] is True
    assert [m["peer_id"] for m in seen["pool"]["members"]] == [owner.peer_id]
    assert device_http.get("/api/pool/private-mode").json()["members"] == 0
    # Removed, it is in no pool: it may start its own.
    own = device_http.post("/api/pool", json={"name": "laptop pool"})
    assert own.status_code == 201 and own.json()["role"] == "owner"
    assert [m["peer_id"] for m in own.json()["pool"]["members"]] == [laptop.peer_id]

    assert device_http.post("/api/pool/leave").json() == {"left": True}
    assert device_http.get("/api/pool/state").json()["pool"] is None
    assert http.post("/api/pool/leave").json() == {"left": True}
    _error(http.post("/api/pool/leave"), 404)


def test_a_bad_code_is_refused_with_the_reason(http):
    assert "starts with swarmpool://" in _error(http.post("/api/pool/join", json={"code": "swarm://x"}), 400)


def test_private_mode_round_trips_through_config_yaml_and_signals_the_supervisor(
    http, control_app, monkeypatch
):
    signals: list[int] = []
    monkeypatch.setattr(admin, "signal_supervisor", lambda signum: signals.append(signum) or True)
    assert http.get("/api/pool/private-mode").json() == {
        "private_mode": False,
        "allow_lan": True,
        "members": 0,
    }

    answer = http.put("/api/pool/private-mode", json={"private_mode": True})
    assert answer.status_code == 200
    assert answer.json()["private_mode"] is True and answer.json()["allow_lan"] is True
    assert "only this node and peers on the local network" in answer.json()["warning"]
    assert signals == [signal.SIGHUP]
    saved = yaml.safe_load((control_app.config["DATA_DIR"] / "config.yaml").read_text())
    assert saved["pool"] == {"private_mode": True}

    http.put("/api/pool/private-mode", json={"private_mode": True, "allow_lan": False})
    saved = yaml.safe_load((control_app.config["DATA_DIR"] / "config.yaml").read_text())
    assert saved["pool"] == {"private_mode": True, "private_mode_allow_lan": False}
    assert signals == [signal.SIGHUP, signal.SIGHUP]
    state = http.get("/api/pool/state").json()
    assert (state["private_mode"], state["private_mode_allow_lan"]) == (True, False)

    http.post("/api/pool", json={"name": "home lab"})
    assert http.get("/api/pool/private-mode").json() == {
        "private_mode": True,
        "allow_lan": False,
        "members": 1,
    }
    assert http.put("/api/pool/private-mode", json={"private_mode": False}).json() == {
        "private_mode": False,
        "allow_lan": False,
        "members": 1,
    }
    saved = yaml.safe_load((control_app.config["DATA_DIR"] / "config.yaml").read_text())
    assert saved["pool"] == {"private_mode_allow_lan": False}


@pytest.mark.parametrize(
    ("method", "path", "body", "param"),
    [
        ("post", "/api/pool", {"name": 5}, "name"),
        ("post", "/api/pool", {"name": "  "}, "name"),
        ("post", "/api/pool", {}, "name"),
        ("post", "/api/pool", {"name": "lab", "device_name": 3}, "device_name"),
        ("post", "/api/pool", {"name": "x" * 65}, None),
        ("post", "/api/pool/invitations", {"device_name": ["laptop"]}, "device_name"),
        ("post", "/api/pool/join", {"code": 7}, "code"),
        ("post", "/api/pool/join", {}, "code"),
        ("put", "/api/pool/private-mode", {"private_mode": "yes"}, "private_mode"),
        ("put", "/api/pool/private-mode", {"allow_lan": True}, "private_mode"),
        ("put", "/api/pool/private-mode", {"private_mode": True, "allow_lan": 1}, "allow_lan"),
    ],
)
def test_malformed_bodies_are_400_naming_the_field(http, method, path, body, param):
    response = getattr(http, method)(path, json=body)
    message = _error(response, 400)
    assert response.json()["error"]["param"] == param
    if param:
        assert param in message


@pytest.mark.parametrize(("method", "path"), [("post", "/api/pool"), ("put", "/api/pool/private-mode")])
def test_a_body_that_is_not_a_json_object_is_400(http, method, path):
    assert "JSON object" in _error(getattr(http, method)(path, content=b"[1, 2"), 400)
    assert "JSON object" in _error(getattr(http, method)(path, json=["private_mode"]), 400)
