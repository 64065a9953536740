"""Pools over the network: devices join a real owner's stage on loopback, members fetch the
member list, forged and replayed joins are refused, and private mode picks the allowed peers.

The owner is an in-process `StageServer` for a tiny llama with a `PoolDesk`; devices talk to
it over the encrypted peer channel exactly as `swarm pool join` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from swarm import wire
from swarm.identity import Identity
from swarm.pool import Acceptance, Invitation, PoolError, PoolState, PoolStore
from swarm.pool_desk import PoolDesk, fetch_state, private_peers, request_join
from swarm.secure_channel import SecureChannel

NETWORK = "swarm-pool-test"


def load_stage_engine(tiny_model, data_dir: Path):
    """A tiny llama's whole model as a stage engine: pool exchanges need a stage, not its layers."""
    from swarm.engine import EngineSettings
    from swarm.loader import open_model
    from swarm.stage import StageEngine

    model = open_model(str(tiny_model("llama-tiny")), data_dir)
    settings = EngineSettings(kv_cache="f32", max_context=64)
    return StageEngine.load(model.gguf, model.config, (0, model.config.n_layers), settings)


@pytest.fixture(scope="module")
def stage_engine(tiny_model, data_dir):
    return load_stage_engine(tiny_model, data_dir)


@contextmanager
def pool_stage(engine, store: PoolStore, identity: Identity, network_id: str, max_size: int = 4) -> Iterator:
    """A stage on loopback that answers pool messages for `identity`'s pool in `store`."""
    from swarm.stage import StageConfig, StageServer

    config = StageConfig(model_id="tiny", network_id=network_id)
    server = StageServer(engine, identity, config, pool=PoolDesk(store, identity, max_size)).start()
    try:
        yield server
    finally:
        server.close()


@dataclass
class Owner:
    identity: Identity
    store: PoolStore
    address: str

    def invite(self, device_name: str = "", network_id: str = NETWORK) -> Invitation:
        invitation = Invitation.create(
            self.identity,
            pool_name="home lab",
            owner_address=self.address,
            network_id=network_id,
            ttl_s=600.0,
            device_name=device_name,
        )
        self.store.record_invitation(invitation)
        return invitation


@pytest.fixture
def owner(tmp_path: Path, stage_engine) -> Iterator[Owner]:
    identity = Identity.load_or_create(tmp_path / "owner")
    store = PoolStore(tmp_path / "owner")
    store.save(PoolState.create(identity, "home lab", device_name="desktop"))
    with pool_stage(stage_engine, store, identity, NETWORK) as server:
        yield Owner(identity, store, server.address)


def _device(tmp_path: Path, name: str) -> tuple[Identity, PoolStore]:
    return Identity.load_or_create(tmp_path / name), PoolStore(tmp_path / name)


def test_a_device_joins_and_both_stores_hold_the_same_verified_state(tmp_path: Path, owner: Owner):
    identity, store = _device(tmp_path, "laptop")
    state = request_join(identity, NETWORK, owner.invite().to_code(), "laptop", store=store)
    assert state.member_ids() == {owner.identity.peer_id, identity.peer_id}
    assert [m.device_name for m in state.members] == ["desktop", "laptop"]
    assert state.version == 2
    assert store.state() == owner.store.state() == state
    state.verify()
    assert owner.store.invitations() == []  # the code is used up


def test_a_code_admits_one_device_once(tmp_path: Path, owner: Owner):
    code = owner.invite().to_code()
    first, first_store = _device(tmp_path, "laptop")
    request_join(first, NETWORK, code, store=first_store)
    with pytest.raises(PoolError, match="already used"):
        request_join(first, NETWORK, code, store=first_store)
    second, second_store = _device(tmp_path, "phone")
    with pytest.raises(PoolError, match="already used"):
        request_join(second, NETWORK, code, store=second_store)
    assert second_store.state() is None
    assert owner.store.state().member_ids() == {owner.identity.peer_id, first.peer_id}


def test_a_code_for_another_network_is_refused_before_any_exchange(tmp_path: Path, owner: Owner):
    identity, store = _device(tmp_path, "laptop")
    with pytest.raises(PoolError, match="for network 'elsewhere'"):
        request_join(identity, NETWORK, owner.invite(network_id="elsewhere").to_code(), store=store)
    assert len(owner.store.invitations()) == 1 and store.state() is None


def test_an_acceptance_signed_by_another_key_than_the_channels_is_refused(tmp_path: Path, owner: Owner):
    invitation = owner.invite()
    sender, someone_else = Identity.generate(), Identity.generate()
    forged = Acceptance.create(someone_else, invitation)
    body = {"kind": "join", "invitation": invitation.to_dict(), "acceptance": forged.to_dict()}
    host, port = owner.address.rsplit(":", 1)
    with SecureChannel.connect(
        (host, int(port)), sender, NETWORK, expected_peer=owner.identity.public_key, timeout=5.0
    ) as channel:
        channel.send(wire.encode(wire.PoolMessage(body)))
        reply = wire.decode(channel.recv(timeout=5.0))
    assert isinstance(reply, wire.Error)
    assert "signed by another device" in reply.message
    assert owner.store.state().member_ids() == {owner.identity.peer_id}
    assert [i.invitation.invitation_id for i in owner.store.invitations()] == [invitation.invitation_id]


def test_members_fetch_the_state_and_a_removed_member_sees_itself_gone(tmp_path: Path, owner: Owner):
    laptop, laptop_store = _device(tmp_path, "laptop")
    phone, phone_store = _device(tmp_path, "phone")
    request_join(laptop, NETWORK, owner.invite().to_code(), store=laptop_store)
    joined = request_join(phone, NETWORK, owner.invite().to_code(), store=phone_store)
    seen = fetch_state(laptop, NETWORK, owner.address, laptop_store.state())
    assert seen == joined and seen.member_ids() == {owner.identity.peer_id, laptop.peer_id, phone.peer_id}

    owner.store.save(owner.store.state().without_member(owner.identity, phone.peer_id))
    after = fetch_state(phone, NETWORK, owner.address, phone_store.state())
    assert after.version == joined.version + 1
    assert after.member_ids() == {owner.identity.peer_id, laptop.peer_id}
    assert phone.peer_id in after.removed
    phone_store.save(after)
    assert private_peers(phone_store, phone, private_mode=True, allow_lan=False) == {phone.peer_id}


def test_a_stranger_cannot_read_the_member_list(tmp_path: Path, owner: Owner):
    stranger = Identity.generate()
    with pytest.raises(PoolError, match="only members"):
        fetch_state(stranger, NETWORK, owner.address, owner.store.state())


def test_private_peers_are_the_pool_and_lan_peers_only_in_private_mode(tmp_path: Path, owner: Owner):
    laptop, laptop_store = _device(tmp_path, "laptop")
    request_join(laptop, NETWORK, owner.invite().to_code(), store=laptop_store)
    lan = ["a" * 32, "b" * 32]
    pool = {owner.identity.peer_id, laptop.peer_id}

    def allowed(store: PoolStore, identity: Identity, **mode: bool):
        return private_peers(store, identity, lan_peers=lan, **mode)

    assert allowed(laptop_store, laptop, private_mode=False, allow_lan=True) is None
    assert allowed(laptop_store, laptop, private_mode=True, allow_lan=False) == pool
    assert allowed(owner.store, owner.identity, private_mode=True, allow_lan=False) == pool
    assert allowed(laptop_store, laptop, private_mode=True, allow_lan=True) == pool | set(lan)
    loner, loner_store = _device(tmp_path, "loner")
    assert allowed(loner_store, loner, private_mode=True, allow_lan=False) == {loner.peer_id}
