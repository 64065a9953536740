"""Device pools API: `/api/pool/*`, this node's pool, its invitations and private mode.

Owns the routes that create a pool, invite devices to it (a `swarmpool://` code naming
this node's peer stage), join another node's pool (`swarm.pool_desk.request_join`, over
the encrypted peer channel), remove members, leave, and turn private mode on and off
(saved to config.yaml; the supervisor is signalled so the node routes by it). The pool
itself lives in `<data_dir>/swarm.db` (`swarm.pool.PoolStore`), read directly, so every
route but an invitation answers while the node is down. Also owns the parts `swarm pool`
shares: `describe_pool`, `invitation_address`, `join_refusal`, `private_mode_view`. The API
key is required as on every /api route (control.middleware). Must not import jax.
"""

from __future__ import annotations

import signal
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from control import admin

# control.app imports this module: reach its accessors through the module, at call time.
from control import app as application
from control.errors import ApiError
from control.middleware import json_body
from swarm.config import PoolConfig
from swarm.identity import Identity
from swarm.pool import Invitation, PoolError, PoolState, PoolStore
from swarm.pool_desk import request_join

bp = Blueprint("pool", __name__, url_prefix="/api/pool")

_WILDCARD_HOSTS = ("", "0.0.0.0", "::")
_LOOPBACK_PREFIXES = ("127.", "::1", "localhost")


# --- shared with `swarm pool` -------------------------------------------------------------


def role_of(state: PoolState | None, identity: Identity) -> str | None:
    """This node's role in `state`: owner, member, or None (in no pool, or removed from it)."""
    if state is None or identity.peer_id not in state.member_ids():
        return None
    return "owner" if state.pool_id == identity.peer_id else "member"


def describe_pool(store: PoolStore, identity: Identity) -> dict[str, Any]:
    """This node's pool as the API and `swarm pool members --json` show it: the members,
    this node's role, whether it was removed, and (for the owner) the open invitations."""
    state = store.state()
    role = role_of(state, identity)
    pool = None
    if state is not None:
        pool = {
            "pool_id": state.pool_id,
            "name": state.name,
            "version": state.version,
            "created_at": state.created_at,
            "updated_at": state.updated_at,
            "members": [
                {
                    "peer_id": member.peer_id,
                    "device_name": member.device_name,
                    "joined_at": member.joined_at,
                    "owner": member.peer_id == state.pool_id,
                    "self": member.peer_id == identity.peer_id,
                }
                for member in state.members
            ],
        }
    invitations = []
    if role == "owner":
        invitations = [
            {
                "invitation_id": issued.invitation.invitation_id,
                "device_name": issued.invitation.device_name,
                "expires": issued.invitation.expires,
                "code": issued.invitation.to_code(),
            }
            for issued in store.invitations()
        ]
    return {
        "pool": pool,
        "role": role,
        "removed": state is not None and role is None,
        "peer_id": identity.peer_id,
        "invitations": invitations,
    }


def invitation_address(info: dict[str, Any]) -> tuple[str, str | None]:
    """The "host:port" other devices reach this node's peer stage at, from the node's info,
    and a warning when only this machine can; PoolError when the node serves no network."""
    stage = (info.get("peering") or {}).get("stage") or {}
    address = stage.get("address")
    if not isinstance(address, str) or ":" not in address:
        raise PoolError(
            "this node is not serving in a network (no peer stage): start it with a model and "
            "pool.offline_mode off before inviting devices"
        )
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host in _WILDCARD_HOSTS:
        from swarm.dht import advertised_host  # jax-free; only needed for a wildcard bind

        host = advertised_host("0.0.0.0")
    warning = None
    if host.startswith(_LOOPBACK_PREFIXES):
        warning = (
            f"the peer stage listens on {host} only, so only devices on this machine can join: "
            "set network.listen_address to 0.0.0.0 and restart to invite other machines"
        )
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}", warning


def join_refusal(state: PoolState | None, identity: Identity) -> str | None:
    """Why this node may not join another pool now (it owns one with other devices), or None."""
    if state is None or role_of(state, identity) != "owner" or len(state.members) < 2:
        return None
    return (
        f"this node owns pool {state.name!r} with {len(state.members) - 1} other devices: "
        "remove them or leave the pool before joining another"
    )


def private_mode_view(pool: PoolConfig, store: PoolStore, identity: Identity) -> dict[str, Any]:
    """Private mode as configured, the pool members it routes through (0: not in a pool),
    and a warning when it is on with no pool, so that only this node can serve."""
    state = store.state()
    members = len(state.members) if state is not None and role_of(state, identity) else 0
    answer: dict[str, Any] = {
        "private_mode": pool.private_mode,
        "allow_lan": pool.private_mode_allow_lan,
        "members": members,
    }
    if pool.private_mode and members == 0:
        also = " and peers on the local network" if pool.private_mode_allow_lan else ""
        answer["warning"] = (
            f"private mode is on and this node is in no pool: only this node{also} can serve its requests"
        )
    return answer


# --- request helpers ----------------------------------------------------------------------


def _context() -> tuple[PoolStore, Identity]:
    data_dir = current_app.config["DATA_DIR"]
    return PoolStore(data_dir), Identity.load_or_create(data_dir)


def _network_id() -> str:
    return application.settings().network.gossip_network_id


def _body(*, optional: bool = False) -> dict[str, Any]:
    """The JSON object body; with `optional`, an empty body reads as {}."""
    if optional and not request.get_data(cache=True).strip():
        return {}
    return json_body()


def _text(body: dict[str, Any], name: str, *, required: bool = False) -> str:
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        kind = "a non-empty string" if required else "a string"
        raise ApiError(400, f"{name} must be {kind}", code="invalid_request", param=name)
    return value


def _flag(body: dict[str, Any], name: str, *, required: bool = False) -> bool | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false", code="invalid_request", param=name)
    return value


def _owned_state(store: PoolStore, identity: Identity) -> PoolState:
    """This node's pool, which it must own: 409 without a pool, 403 as a member."""
    state = store.state()
    role = role_of(state, identity)
    if state is None or role is None:
        raise ApiError(409, "this node is in no pool: create one first", code="no_pool")
    if role != "owner":
        raise ApiError(
            403, f"only the owner of pool {state.name!r} ({state.pool_id}) can do this", code="not_owner"
        )
    return state


def _state_response() -> dict[str, Any]:
    store, identity = _context()
    pool = application.settings().pool
    return {
        **describe_pool(store, identity),
        "private_mode": pool.private_mode,
        "private_mode_allow_lan": pool.private_mode_allow_lan,
        "offline_mode": pool.offline_mode,
        "max_pool_size": pool.max_pool_size,
    }


# --- routes -------------------------------------------------------------------------------


@bp.get("/state")
def get_state() -> Response:
    return jsonify(_state_response())


@bp.post("")
def create_pool() -> tuple[Response, int]:
    body = _body()
    name, device_name = _text(body, "name", required=True), _text(body, "device_name")
    store, identity = _context()
    current = store.state()
    if current is not None and role_of(current, identity) is not None:
        raise ApiError(
            409, f"this node is already in pool {current.name!r}: leave it first", code="already_in_pool"
        )
    try:
        state = PoolState.create(identity, name, device_name)
        if current is not None:  # a pool this node was removed from: forget it
            store.leave()
        store.save(state)
    except PoolError as error:
        raise ApiError(400, str(error), code="invalid_request") from None
    return jsonify(_state_response()), 201


@bp.post("/invitations")
def create_invitation() -> tuple[Response, int]:
    device_name = _text(_body(optional=True), "device_name")
    store, identity = _context()
    state = _owned_state(store, identity)
    info = application.node().info()  # node down: 503 through the middleware's handler
    try:
        address, warning = invitation_address(info)
    except PoolError as error:
        raise ApiError(409, str(error), code="not_in_network") from None
    network_id = (info.get("peering") or {}).get("network_id") or _network_id()
    try:
        invitation = Invitation.create(
            identity,
            pool_name=state.name,
            owner_address=address,
            network_id=network_id,
            ttl_s=application.settings().pool.invitation_ttl_hours * 3600.0,
            device_name=device_name,
        )
    except PoolError as error:
        raise ApiError(400, str(error), code="invalid_request") from None
    try:
        store.record_invitation(invitation)
    except PoolError as error:
        raise ApiError(409, str(error), code="too_many_invitations") from None
    answer = {
        "code": invitation.to_code(),
        "invitation_id": invitation.invitation_id,
        "expires": invitation.expires,
        "owner_address": address,
    }
    if warning:
        answer["warning"] = warning
    return jsonify(answer), 201


@bp.delete("/invitations/<invitation_id>")
def revoke_invitation(invitation_id: str) -> tuple[str, int]:
    store, _ = _context()
    if not store.revoke_invitation(invitation_id):
        raise ApiError(404, f"no open invitation {invitation_id}", code="not_found")
    return "", 204


@bp.post("/join")
def join_pool() -> Response:
    body = _body()
    code, device_name = _text(body, "code", required=True), _text(body, "device_name")
    store, identity = _context()
    refusal = join_refusal(store.state(), identity)
    if refusal:
        raise ApiError(409, refusal, code="owns_pool")
    try:
        request_join(identity, _network_id(), code, device_name, store=store)
    except PoolError as error:
        raise ApiError(400, str(error), code="join_refused") from None
    return jsonify(_state_response())


@bp.delete("/members/<peer_id>")
def remove_member(peer_id: str) -> Response:
    store, identity = _context()
    state = _owned_state(store, identity)
    if peer_id == identity.peer_id:
        raise ApiError(
            400, "the owner cannot remove itself: leave the pool to dissolve it", code="invalid_request"
        )
    if peer_id not in state.member_ids():
        raise ApiError(404, f"device {peer_id} is not a member of pool {state.name!r}", code="not_found")
    try:
        store.save(state.without_member(identity, peer_id))
    except PoolError as error:  # a concurrent change saved a newer state first
        raise ApiError(409, str(error), code="conflict") from None
    return jsonify(_state_response())


@bp.post("/leave")
def leave_pool() -> Response:
    store, _ = _context()
    if store.state() is None:
        raise ApiError(404, "this node is in no pool", code="no_pool")
    store.leave()
    return jsonify({"left": True})


def _private_mode() -> dict[str, Any]:
    store, identity = _context()
    return private_mode_view(application.settings().pool, store, identity)


@bp.get("/private-mode")
def get_private_mode() -> Response:
    return jsonify(_private_mode())


@bp.put("/private-mode")
def put_private_mode() -> Response:
    body = _body()
    updates: dict[str, Any] = {"private_mode": _flag(body, "private_mode", required=True)}
    allow_lan = _flag(body, "allow_lan")
    if allow_lan is not None:
        updates["private_mode_allow_lan"] = allow_lan
    admin.save_updates({"pool": updates})
    admin.signal_supervisor(signal.SIGHUP)  # the node routes by the new setting from now on
    return jsonify(_private_mode())
