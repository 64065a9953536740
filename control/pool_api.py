"""Device pools API: `/api/pool/*`, this node's pool, its invitations and private mode.

Owns the routes that create a pool, invite devices to it (a `swarmpool://` code naming
this node's peer stage), join another node's pool (`swarm.pool_desk.request_join`, over
the encrypted peer channel), remove members, leave, and turn private mode on and off
(saved to config.yaml; the supervisor is signalled so the node routes by it). The pool
itself lives in `<data_dir>/swarm.db` (`swarm.pool.PoolStore`), read directly, so every
route but an invitation answers while the node is down. What the API shows is built by
`swarm.pool_view`, shared with `swarm pool`. The API key is required as on every /api
route (control.middleware). Must not import jax.
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
from swarm.identity import Identity
from swarm.pool import Invitation, PoolError, PoolState, PoolStore
from swarm.pool_desk import request_join
from swarm.pool_view import describe_pool, invitation_address, join_refusal, private_mode_view, role_of

bp = Blueprint("pool", __name__, url_prefix="/api/pool")

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
