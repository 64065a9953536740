"""Pools over the network: joining an owner's pool, keeping its member list, private mode.

Owns the exchanges of `wire.PoolMessage` (formats and signatures are `swarm.pool`'s):

    device -> owner's stage   {"kind": "join", "invitation", "acceptance", "device_name"}
    owner  -> device          {"kind": "state", "state"}     the new signed member list
    member -> owner's stage   {"kind": "get_state"}
    owner  -> member          {"kind": "state", "state"}     to members and removed members

- `PoolDesk.answer`: the owner's side, behind its stage. A join is admitted only from
  the device that signed the acceptance (the channel's authenticated key), for an
  invitation this owner issued and nobody used (`swarm.pool.admit`).
- `request_join`, `fetch_state`: the device's and member's side; every state received is
  verified (owner's signature, every member's two signatures) before it is stored.
- `private_peers`: in private mode (`pool.private_mode`), the peer ids a request may
  route through: this node, the pool's members and, with `pool.private_mode_allow_lan`,
  the peers found on the local network by mDNS. None when private mode is off.

Imports no jax: the control plane and the CLI join pools through it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from swarm import wire
from swarm.identity import Identity, peer_id_of
from swarm.pool import Acceptance, Invitation, PoolError, PoolState, PoolStore, admit
from swarm.pool_view import join_refusal
from swarm.secure_channel import ChannelError, SecureChannel

log = logging.getLogger(__name__)

EXCHANGE_TIMEOUT_S = 10.0


class PoolDesk:
    """The owner's side of pool exchanges, for the stage server."""

    def __init__(self, store: PoolStore, identity: Identity, max_size: int) -> None:
        self.store = store
        self.identity = identity
        self.max_size = max_size

    def answer(self, body: dict[str, Any], peer_key: bytes) -> dict[str, Any]:
        """The reply to one PoolMessage from the peer holding `peer_key`; PoolError to refuse."""
        kind = body.get("kind")
        state = self.store.state()
        if state is None or state.pool_id != self.identity.peer_id:
            raise PoolError("this node owns no pool")
        if kind == "join":
            invitation = Invitation.from_dict(body.get("invitation"))
            acceptance = Acceptance.from_dict(body.get("acceptance"))
            if acceptance.member_key != peer_key:
                raise PoolError("the acceptance was signed by another device than the one asking")
            new = admit(self.store, self.identity, invitation, acceptance, self.max_size)
            log.info("device %s joined pool %s", peer_id_of(peer_key), new.name)
            return {"kind": "state", "state": new.to_dict()}
        if kind == "get_state":
            asker = peer_id_of(peer_key)
            if asker not in state.member_ids() and asker not in state.removed:
                raise PoolError("only members see the pool's member list")
            return {"kind": "state", "state": state.to_dict()}
        raise PoolError(f"unknown pool message {kind!r}")


def _exchange(
    identity: Identity, network_id: str, address: str, owner_key: bytes, body: dict[str, Any]
) -> PoolState:
    if not address:
        raise PoolError("the pool owner's address is not known")
    try:
        channel = SecureChannel.connect(
            address,
            identity,
            network_id,
            expected_peer=owner_key,
            timeout=EXCHANGE_TIMEOUT_S,
        )
    except (ChannelError, ValueError) as error:
        raise PoolError(f"the pool owner at {address} cannot be reached: {error}") from None
    try:
        channel.send(wire.encode(wire.PoolMessage(body)), timeout=EXCHANGE_TIMEOUT_S)
        reply = wire.decode(channel.recv(timeout=EXCHANGE_TIMEOUT_S))
    except (ChannelError, wire.WireError) as error:
        raise PoolError(f"the pool owner at {address} did not answer: {error}") from None
    finally:
        channel.close()
    if isinstance(reply, wire.Error):
        raise PoolError(f"the pool owner refused: {reply.message}")
    if not isinstance(reply, wire.PoolMessage) or reply.body.get("kind") != "state":
        raise PoolError(f"the pool owner answered with {type(reply).__name__}")
    state = PoolState.from_dict(reply.body.get("state"))
    state.verify()
    if state.owner_key != owner_key:
        raise PoolError("the pool state is not the owner's")
    return state


def request_join(
    identity: Identity, network_id: str, code: str, device_name: str = "", store: PoolStore | None = None
) -> PoolState:
    """Joins the pool of an invite code: signs the acceptance, has the owner admit it, and
    stores the owner's new member list (in `store`, when given). PoolError naming the problem."""
    invitation = Invitation.from_code(code)
    invitation.verify()
    if store is not None:
        refusal = join_refusal(store.state(), identity)
        if refusal is not None:
            raise PoolError(refusal)
    if invitation.network_id != network_id:
        raise PoolError(
            f"the invitation is for network {invitation.network_id!r}, this node is in {network_id!r}"
        )
    acceptance = Acceptance.create(identity, invitation, device_name)
    body = {"kind": "join", "invitation": invitation.to_dict(), "acceptance": acceptance.to_dict()}
    state = _exchange(identity, network_id, invitation.owner_address, invitation.owner_key, body)
    if identity.peer_id not in state.member_ids():
        raise PoolError("the owner's answer does not list this device as a member")
    if store is not None:
        current = store.state()
        if current is not None and current.pool_id != state.pool_id:
            store.leave()
        store.save(state)
    return state


def fetch_state(identity: Identity, network_id: str, address: str, current: PoolState) -> PoolState:
    """The owner's current member list of `current`'s pool, verified."""
    state = _exchange(identity, network_id, address, current.owner_key, {"kind": "get_state"})
    if state.pool_id != current.pool_id:
        raise PoolError("the owner answered for another pool")
    return state


def owner_address(state: PoolState, identity: Identity) -> str:
    """Where this member reached the owner: the address in its own invitation."""
    for member in state.members:
        if member.peer_id == identity.peer_id and member.invitation is not None:
            return member.invitation.owner_address
    return ""


def private_peers(
    store: PoolStore,
    identity: Identity,
    *,
    private_mode: bool,
    allow_lan: bool,
    lan_peers: Iterable[str] = (),
) -> frozenset[str] | None:
    """The peers a private-mode request may use (see the module docstring); None: any."""
    if not private_mode:
        return None
    allowed = {identity.peer_id}
    state = store.state()
    if state is not None and identity.peer_id in state.member_ids():
        allowed |= state.member_ids()
    if allow_lan:
        allowed |= set(lan_peers)
    return frozenset(allowed)
