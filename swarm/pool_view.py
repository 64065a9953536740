"""How this node's pool is shown: by the pool API (`control.pool_api`) and `swarm pool`.

Owns `role_of`, `describe_pool` (members, role, open invitations), `invitation_address`
(where other devices reach this node's peer stage), `join_refusal` and
`private_mode_view`. Reads `swarm.pool`'s store; never imports jax or Flask.
"""

from __future__ import annotations

from typing import Any

from swarm.config import PoolConfig
from swarm.identity import Identity
from swarm.pool import PoolError, PoolState, PoolStore

_WILDCARD_HOSTS = ("", "0.0.0.0", "::")
_LOOPBACK_PREFIXES = ("127.", "::1", "localhost")


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
