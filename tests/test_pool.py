"""Device pools: invitations, acceptances, owner-signed pool states and their SQLite store."""

from __future__ import annotations

import base64
import dataclasses
import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from swarm.identity import Identity
from swarm.pool import (
    MAX_ACTIVE_INVITATIONS,
    Acceptance,
    Invitation,
    Member,
    PoolError,
    PoolState,
    PoolStore,
    admit,
)

NOW = 1_700_000_000.0
TTL = 3600.0


@pytest.fixture
def owner() -> Identity:
    return Identity.generate()


@pytest.fixture
def pool(owner: Identity) -> PoolState:
    return PoolState.create(owner, "home lab", device_name="desktop", now=NOW)


def _invite(owner: Identity, now: float = NOW, **changes: Any) -> Invitation:
    fields = {
        "pool_name": "home lab",
        "owner_address": "192.168.1.5:7000",
        "network_id": "main",
        "ttl_s": TTL,
    }
    return Invitation.create(owner, **{**fields, **changes}, now=now)


def _join(pool: PoolState, owner: Identity, device: Identity, now: float = NOW) -> PoolState:
    invitation = _invite(owner, now)
    return pool.with_member(
        owner, invitation, Acceptance.create(device, invitation, now=now + 1), 10, now + 2
    )


def _resign(record: Any, identity: Identity, **changes: Any) -> Any:
    """`record` with `changes`, signed again by `identity`."""
    changed = dataclasses.replace(record, **changes)
    return dataclasses.replace(changed, signature=identity.sign(changed.signing_bytes()))


def _code(raw: Any) -> str:
    return "swarmpool://" + base64.urlsafe_b64encode(json.dumps(raw).encode()).decode().rstrip("=")


def _owner_store(tmp_path: Path, pool: PoolState) -> PoolStore:
    store = PoolStore(tmp_path / "owner")
    store.save(pool)
    return store


def test_invite_accept_admit_round_trip_verifies_on_both_sides(
    tmp_path: Path, owner: Identity, pool: PoolState
):
    store = _owner_store(tmp_path, pool)
    invitation = _invite(owner, device_name="laptop")
    store.record_invitation(invitation, now=NOW)
    code = invitation.to_code()

    device = Identity.generate()
    received = Invitation.from_code(code)
    received.verify(now=NOW + 10)
    acceptance = Acceptance.create(device, received, now=NOW + 10)

    state = admit(store, owner, received, acceptance, max_size=10, now=NOW + 11)
    state.verify()
    assert state.version == 2
    assert state.member_ids() == {owner.peer_id, device.peer_id}
    assert [member.device_name for member in state.members] == ["desktop", "laptop"]
    assert store.state() == state
    assert store.invitations(now=NOW + 12) == []
    [issued] = store.invitations(now=NOW + 12, active_only=False)
    assert (issued.invitation, issued.used_by, issued.used_at) == (invitation, device.peer_id, NOW + 11)

    # The device receives the state as JSON and keeps its own verified copy.
    device_store = PoolStore(tmp_path / "device")
    device_store.save(PoolState.from_dict(json.loads(json.dumps(state.to_dict()))))
    assert device_store.state() == state


def test_invitation_code_round_trips_and_tolerates_surrounding_whitespace(owner: Identity):
    invitation = _invite(owner, pool_name="Anna's Geräte", device_name="Küche", owner_address="")
    code = invitation.to_code()
    assert code.startswith("swarmpool://")
    assert "=" not in code
    assert Invitation.from_code(f"  {code}\n") == invitation
    Invitation.from_code(code).verify(now=NOW)


def test_expired_invitation_is_rejected_everywhere(owner: Identity, pool: PoolState):
    invitation = _invite(owner)
    invitation.verify(now=NOW + TTL - 1)
    with pytest.raises(PoolError, match="expired"):
        invitation.verify(now=NOW + TTL)
    with pytest.raises(PoolError, match="expired"):
        Acceptance.create(Identity.generate(), invitation, now=NOW + TTL + 5)
    acceptance = Acceptance.create(Identity.generate(), invitation, now=NOW + 5)
    with pytest.raises(PoolError, match="expired"):
        pool.with_member(owner, invitation, acceptance, 10, now=NOW + TTL + 5)


def test_invitation_from_the_future_is_rejected(owner: Identity):
    with pytest.raises(PoolError, match="future"):
        _invite(owner, now=NOW + 600).verify(now=NOW)


@pytest.mark.parametrize(
    "changes",
    [
        {"pool_name": "other pool"},
        {"expires": NOW + 10 * TTL},
        {"owner_address": "6.6.6.6:1"},
        {"network_id": "x"},
    ],
)
def test_tampered_invitation_is_rejected(owner: Identity, changes: dict[str, Any]):
    tampered = dataclasses.replace(_invite(owner), **changes)
    with pytest.raises(PoolError, match="signature"):
        tampered.verify(now=NOW)
    with pytest.raises(PoolError, match="signature"):
        Invitation.from_code(tampered.to_code()).verify(now=NOW)


def test_invitation_re_signed_by_another_key_for_the_owners_pool_is_rejected(owner: Identity):
    mallory = Identity.generate()
    forged = _resign(_invite(owner), mallory, owner_key=mallory.public_key)
    with pytest.raises(PoolError, match="signature"):
        forged.verify(now=NOW)


def test_acceptance_signed_by_a_different_key_than_it_claims_is_rejected(owner: Identity, pool: PoolState):
    invitation = _invite(owner)
    device, mallory = Identity.generate(), Identity.generate()
    honest = Acceptance.create(device, invitation, now=NOW + 1)
    forged = dataclasses.replace(honest, signature=mallory.sign(honest.signing_bytes()))
    with pytest.raises(PoolError, match="signature"):
        forged.verify(invitation)
    with pytest.raises(PoolError, match="signature"):
        pool.with_member(owner, invitation, forged, 10, now=NOW + 2)


def test_acceptance_for_another_invitation_is_rejected(owner: Identity, pool: PoolState):
    first, second = _invite(owner), _invite(owner)
    acceptance = Acceptance.create(Identity.generate(), first, now=NOW + 1)
    with pytest.raises(PoolError, match="different invitation"):
        acceptance.verify(second)
    with pytest.raises(PoolError, match="different invitation"):
        pool.with_member(owner, second, acceptance, 10, now=NOW + 2)


def test_acceptance_made_after_the_invitation_expired_is_rejected(owner: Identity):
    invitation = _invite(owner)
    late = _resign(Acceptance.create(Identity.generate(), invitation, now=NOW + 1), Identity.generate())
    device = Identity.generate()
    late = _resign(late, device, member_key=device.public_key, accepted_at=NOW + TTL + 1)
    with pytest.raises(PoolError, match="while its invitation was valid"):
        late.verify(invitation)


def test_owner_cannot_accept_its_own_invitation(owner: Identity):
    with pytest.raises(PoolError, match="owner cannot join"):
        Acceptance.create(owner, _invite(owner), now=NOW)


def test_a_second_device_replaying_a_used_code_is_rejected(tmp_path: Path, owner: Identity, pool: PoolState):
    store = _owner_store(tmp_path, pool)
    invitation = _invite(owner)
    store.record_invitation(invitation, now=NOW)
    code = invitation.to_code()
    first, second = Identity.generate(), Identity.generate()
    received = Invitation.from_code(code)
    state = admit(store, owner, received, Acceptance.create(first, received, now=NOW + 1), 10, now=NOW + 1)

    replay = Acceptance.create(second, Invitation.from_code(code), now=NOW + 2)
    with pytest.raises(PoolError, match="already"):
        admit(store, owner, received, replay, 10, now=NOW + 2)
    with pytest.raises(PoolError, match="already used"):
        state.with_member(owner, received, replay, 10, now=NOW + 2)
    assert store.state() == state
    assert second.peer_id not in state.member_ids()


def test_admit_refuses_an_invitation_this_node_did_not_issue(
    tmp_path: Path, owner: Identity, pool: PoolState
):
    store = _owner_store(tmp_path, pool)
    recorded = _invite(owner)
    store.record_invitation(recorded, now=NOW)
    # Same id, but a different (validly signed) invitation: not the one that was handed out.
    other = _resign(recorded, owner, device_name="sneaky")
    acceptance = Acceptance.create(Identity.generate(), other, now=NOW + 1)
    with pytest.raises(PoolError, match="not issued by this node"):
        admit(store, owner, other, acceptance, 10, now=NOW + 1)
    unknown = _invite(owner)
    with pytest.raises(PoolError, match="not issued by this node"):
        admit(
            store, owner, unknown, Acceptance.create(Identity.generate(), unknown, now=NOW + 1), 10, NOW + 1
        )
    assert [issued.invitation for issued in store.invitations(now=NOW + 2)] == [recorded]


def test_a_full_pool_refuses_and_the_invitation_stays_usable(
    tmp_path: Path, owner: Identity, pool: PoolState
):
    state = _join(pool, owner, Identity.generate())
    store = _owner_store(tmp_path, state)
    invitation = _invite(owner)
    store.record_invitation(invitation, now=NOW)
    acceptance = Acceptance.create(Identity.generate(), invitation, now=NOW + 3)
    with pytest.raises(PoolError, match="full"):
        admit(store, owner, invitation, acceptance, max_size=2, now=NOW + 3)
    assert store.state() == state
    assert [issued.invitation for issued in store.invitations(now=NOW + 4)] == [invitation]
    assert len(admit(store, owner, invitation, acceptance, max_size=3, now=NOW + 4).members) == 3


def test_only_the_owner_can_change_the_pool(owner: Identity, pool: PoolState):
    device, mallory = Identity.generate(), Identity.generate()
    state = _join(pool, owner, device)
    invitation = _invite(owner)
    acceptance = Acceptance.create(Identity.generate(), invitation, now=NOW + 1)
    with pytest.raises(PoolError, match="not the owner"):
        state.with_member(mallory, invitation, acceptance, 10, now=NOW + 2)
    with pytest.raises(PoolError, match="not the owner"):
        state.without_member(mallory, device.peer_id, now=NOW + 2)
    with pytest.raises(PoolError, match="cannot remove itself"):
        state.without_member(owner, owner.peer_id, now=NOW + 2)
    with pytest.raises(PoolError, match="not a member"):
        state.without_member(owner, mallory.peer_id, now=NOW + 2)


def test_a_state_re_signed_by_a_non_owner_is_rejected(owner: Identity, pool: PoolState):
    state = _join(pool, owner, Identity.generate())
    state.verify()
    mallory = Identity.generate()
    with pytest.raises(PoolError, match="not signed by its owner"):
        _resign(state, mallory, name="taken over").verify()
    with pytest.raises(PoolError, match="does not match"):
        _resign(state, mallory, owner_key=mallory.public_key).verify()
    with pytest.raises(PoolError, match="not signed by its owner"):
        dataclasses.replace(state, version=state.version + 1).verify()


def test_a_member_with_a_forged_acceptance_fails_state_verification(owner: Identity, pool: PoolState):
    """Even the owner cannot list a device that never accepted an invitation."""
    state = _join(pool, owner, Identity.generate())
    victim, member = Identity.generate(), state.members[1]
    assert member.acceptance is not None
    forged_acceptance = _resign(member.acceptance, owner, member_key=victim.public_key)
    forged = dataclasses.replace(
        member, peer_id=victim.peer_id, public_key=victim.public_key, acceptance=forged_acceptance
    )
    with pytest.raises(PoolError, match="signature is not the joining device's"):
        _resign(state, owner, members=(state.members[0], forged)).verify()
    # The real device's genuine acceptance, listed under another device's key.
    borrowed = dataclasses.replace(member, peer_id=victim.peer_id, public_key=victim.public_key)
    with pytest.raises(PoolError, match="made by another key"):
        _resign(state, owner, members=(state.members[0], borrowed)).verify()
    without_acceptance = dataclasses.replace(member, acceptance=None)
    with pytest.raises(PoolError, match="lacks an invitation or an acceptance"):
        _resign(state, owner, members=(state.members[0], without_acceptance)).verify()


def test_state_verify_rejects_duplicates_and_a_missing_owner(owner: Identity, pool: PoolState):
    state = _join(pool, owner, Identity.generate())
    owner_entry, member = state.members
    with pytest.raises(PoolError, match="first member"):
        _resign(state, owner, members=(member, owner_entry)).verify()
    with pytest.raises(PoolError, match="twice"):
        _resign(state, owner, members=(owner_entry, member, member)).verify()
    with pytest.raises(PoolError, match="removed device"):
        _resign(state, owner, removed=(member.peer_id,)).verify()


def test_a_removed_member_cannot_come_back_with_its_old_invitation(owner: Identity, pool: PoolState):
    device = Identity.generate()
    invitation = _invite(owner)
    acceptance = Acceptance.create(device, invitation, now=NOW + 1)
    joined = pool.with_member(owner, invitation, acceptance, 10, now=NOW + 2)
    removed = joined.without_member(owner, device.peer_id, now=NOW + 3)
    removed.verify()
    assert (removed.version, removed.member_ids(), removed.removed) == (3, {owner.peer_id}, (device.peer_id,))
    assert removed.newer_than(joined) and not joined.newer_than(removed)
    with pytest.raises(PoolError, match="already used"):
        removed.with_member(owner, invitation, acceptance, 10, now=NOW + 4)
    with pytest.raises(PoolError, match="more than one member"):
        _resign(removed, owner, members=joined.members, removed=()).verify()

    rejoined = _join(removed, owner, device, now=NOW + 5)
    rejoined.verify()
    assert device.peer_id in rejoined.member_ids()
    assert rejoined.removed == ()


def test_store_keeps_state_and_invitations_across_restarts(tmp_path: Path, owner: Identity, pool: PoolState):
    store = _owner_store(tmp_path, pool)
    used, open_one = _invite(owner), _invite(owner, now=NOW + 1)
    store.record_invitation(used, now=NOW)
    store.record_invitation(open_one, now=NOW + 1)
    device = Identity.generate()
    state = admit(store, owner, used, Acceptance.create(device, used, now=NOW + 2), 10, now=NOW + 2)

    reopened = PoolStore(tmp_path / "owner")
    assert reopened.state() == state
    assert [issued.invitation for issued in reopened.invitations(now=NOW + 3)] == [open_one]
    with pytest.raises(PoolError, match="already used"):
        reopened.mark_used(used.invitation_id, Identity.generate().peer_id, now=NOW + 3)

    reopened.leave()
    assert PoolStore(tmp_path / "owner").state() is None
    assert PoolStore(tmp_path / "owner").invitations(now=NOW + 3, active_only=False) == []


def test_store_refuses_older_foreign_and_conflicting_states(tmp_path: Path, owner: Identity, pool: PoolState):
    store = _owner_store(tmp_path, pool)
    newer = _join(pool, owner, Identity.generate())
    store.save(newer)
    store.save(newer)  # saving the same state again is harmless
    with pytest.raises(PoolError, match="older"):
        store.save(pool)
    with pytest.raises(PoolError, match="same version"):
        store.save(_join(pool, owner, Identity.generate()))
    other_pool = PoolState.create(Identity.generate(), "elsewhere", now=NOW)
    with pytest.raises(PoolError, match="leave it"):
        store.save(other_pool)
    with pytest.raises(PoolError, match="not signed"):
        store.save(dataclasses.replace(newer, version=9))
    assert store.state() == newer
    store.leave()
    store.save(other_pool)
    assert store.state() == other_pool


@pytest.mark.parametrize("corruption", ["{not json", "[]", '{"pool_id": 3}', "tampered"])
def test_a_corrupt_state_row_reads_as_no_pool_and_is_kept(
    tmp_path: Path, owner: Identity, pool: PoolState, corruption: str
):
    store = _owner_store(tmp_path, pool)
    if corruption == "tampered":
        corruption = json.dumps({**pool.to_dict(), "name": "renamed"})
    with sqlite3.connect(store.path) as connection:
        connection.execute("UPDATE pool_state SET state = ?", (corruption,))
    assert PoolStore(tmp_path / "owner").state() is None
    with sqlite3.connect(store.path) as connection:
        assert connection.execute("SELECT state FROM pool_state").fetchall() == [(corruption,)]


def test_at_most_five_invitations_are_open_at_once(tmp_path: Path, owner: Identity, pool: PoolState):
    store = _owner_store(tmp_path, pool)
    invitations = [_invite(owner) for _ in range(MAX_ACTIVE_INVITATIONS)]
    for invitation in invitations:
        store.record_invitation(invitation, now=NOW)
    with pytest.raises(PoolError, match="open already"):
        store.record_invitation(_invite(owner), now=NOW)
    assert len(store.invitations(now=NOW)) == MAX_ACTIVE_INVITATIONS

    store.mark_used(invitations[0].invitation_id, Identity.generate().peer_id, now=NOW + 1)
    store.record_invitation(_invite(owner), now=NOW + 1)  # a used one frees its place
    assert store.revoke_invitation(invitations[1].invitation_id)
    assert not store.revoke_invitation(invitations[0].invitation_id)  # used ones stay on record
    store.record_invitation(_invite(owner), now=NOW + 1)
    with pytest.raises(PoolError, match="open already"):
        store.record_invitation(_invite(owner), now=NOW + 1)
    later = NOW + TTL + 1  # all have expired
    store.record_invitation(_invite(owner, now=later), now=later)
    assert len(store.invitations(now=later)) == 1


def test_mark_used_names_what_is_wrong(tmp_path: Path, owner: Identity, pool: PoolState):
    store = _owner_store(tmp_path, pool)
    invitation = _invite(owner)
    store.record_invitation(invitation, now=NOW)
    with pytest.raises(PoolError, match="unknown invitation"):
        store.mark_used("0" * 32, owner.peer_id, now=NOW)
    with pytest.raises(PoolError, match="expired"):
        store.mark_used(invitation.invitation_id, owner.peer_id, now=NOW + TTL)
    store.mark_used(invitation.invitation_id, owner.peer_id, now=NOW + 1)


def test_two_threads_using_one_invitation_exactly_one_wins(tmp_path: Path, owner: Identity, pool: PoolState):
    store = _owner_store(tmp_path, pool)
    invitation = _invite(owner)
    store.record_invitation(invitation, now=NOW)
    barrier, results = threading.Barrier(8), list[str | None]()

    def use(peer_id: str) -> None:
        barrier.wait()
        try:
            PoolStore(tmp_path / "owner").mark_used(invitation.invitation_id, peer_id, now=NOW + 1)
            results.append(peer_id)
        except PoolError:
            results.append(None)

    threads = [threading.Thread(target=use, args=(Identity.generate().peer_id,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [peer_id for peer_id in results if peer_id is not None]
    assert len(results) == 8 and len(winners) == 1
    [issued] = store.invitations(now=NOW + 2, active_only=False)
    assert issued.used_by == winners[0]


def test_concurrent_admissions_keep_every_admitted_device(tmp_path: Path, owner: Identity, pool: PoolState):
    store = _owner_store(tmp_path, pool)
    devices = [Identity.generate() for _ in range(4)]
    invitations = [_invite(owner) for _ in devices]
    for invitation in invitations:
        store.record_invitation(invitation, now=NOW)
    barrier = threading.Barrier(len(devices))

    def join(device: Identity, invitation: Invitation) -> None:
        acceptance = Acceptance.create(device, invitation, now=NOW + 1)
        barrier.wait()
        admit(PoolStore(tmp_path / "owner"), owner, invitation, acceptance, 10, now=NOW + 2)

    threads = [threading.Thread(target=join, args=pair) for pair in zip(devices, invitations, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    state = store.state()
    assert state is not None
    assert state.version == 1 + len(devices)
    assert state.member_ids() == {owner.peer_id} | {device.peer_id for device in devices}


def _valid_invitation_dict() -> dict[str, Any]:
    return _invite(Identity.generate()).to_dict()


@pytest.mark.parametrize(
    "code",
    [
        "",
        "   ",
        "swarm://abc",
        "https://example.com/swarmpool",
        "swarmpool://",
        "swarmpool://not base64!",
        "swarmpool://a",
        "swarmpool://" + "A" * 5000,
        _code("just a string")[:-2] + "!!",
        "swarmpool://" + base64.urlsafe_b64encode(b"\xff\xfe not json").decode().rstrip("="),
        "swarmpool://" + base64.urlsafe_b64encode(b"[" * 3000).decode().rstrip("="),
        _code(None),
        _code([1, 2, 3]),
        _code({}),
        _code({**_valid_invitation_dict(), "issued": "yesterday"}),
        _code({**_valid_invitation_dict(), "issued": True}),
        _code({**_valid_invitation_dict(), "expires": 10**400}),
        _code({**_valid_invitation_dict(), "owner_key": 7}),
        _code({**_valid_invitation_dict(), "owner_key": "zz" * 32}),
        _code({**_valid_invitation_dict(), "owner_key": "AB" * 32}),
        _code({**_valid_invitation_dict(), "signature": "00" * 10}),
        _code({**_valid_invitation_dict(), "invitation_id": "00"}),
        _code({**_valid_invitation_dict(), "pool_id": "not a peer id"}),
        _code({**_valid_invitation_dict(), "pool_name": ["a"]}),
        _code({**_valid_invitation_dict(), "pool_name": ""}),
        _code({**_valid_invitation_dict(), "pool_name": "x" * 65}),
        _code({**_valid_invitation_dict(), "device_name": "bell\x07"}),
        _code({**_valid_invitation_dict(), "network_id": {"a": 1}}),
        _code({**_valid_invitation_dict(), "owner_address": "é"}),
    ],
)
def test_from_code_raises_only_pool_error_on_garbage(code: str):
    with pytest.raises(PoolError):
        Invitation.from_code(code)


@pytest.mark.parametrize("value", [None, 5, b"swarmpool://"])
def test_from_code_refuses_what_is_not_text(value: Any):
    with pytest.raises(PoolError, match="text"):
        Invitation.from_code(value)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda raw: raw.pop("members"),
        lambda raw: raw.update(members="owner"),
        lambda raw: raw.update(members=[None]),
        lambda raw: raw.update(members=[{}] * 300),
        lambda raw: raw.update(version=0),
        lambda raw: raw.update(version=1.5),
        lambda raw: raw.update(version=True),
        lambda raw: raw.update(removed=[5]),
        lambda raw: raw.update(removed="abc"),
        lambda raw: raw.update(retired_invitations=["nothex"]),
        lambda raw: raw.update(created_at=float("nan")),
        lambda raw: raw.update(created_at=-1),
        lambda raw: raw["members"][1].update(invitation="code"),
        lambda raw: raw["members"][1]["acceptance"].update(member_key=None),
        lambda raw: raw["members"][1]["invitation"].pop("signature"),
    ],
)
def test_state_from_dict_raises_only_pool_error_on_malformed_input(
    owner: Identity, pool: PoolState, mutate: Any
):
    raw = json.loads(json.dumps(_join(pool, owner, Identity.generate()).to_dict()))
    mutate(raw)
    with pytest.raises(PoolError):
        PoolState.from_dict(raw)


def test_member_and_state_dicts_round_trip(owner: Identity, pool: PoolState):
    state = _join(pool, owner, Identity.generate())
    assert Member.from_dict(state.members[1].to_dict()) == state.members[1]
    assert PoolState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_module_imports_no_heavy_dependency():
    code = "import sys, swarm.pool; sys.exit(any(m in sys.modules for m in ('jax', 'numpy')))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
