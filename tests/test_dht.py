"""Discovery: signed records, invite codes, the peer cache, and DHT processes on loopback.

The process tests start real `python -m swarm.dht` processes (127.0.0.1, free ports, mDNS
off except in the mDNS test, each test on its own network id) and talk to them only
through their local socket.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import random
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import libnacl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kademlia.network import Server
from kademlia.utils import digest

from swarm.dht_client import DhtClient, DhtError, DhtUnavailable
from swarm.dht_network import RecordStorage
from swarm.identity import Identity
from swarm.invite import MAX_CODE_CHARS, Invite, InviteError
from swarm.peer_cache import MAX_ROWS, CachedPeer, PeerCache
from swarm.records import (
    MAX_RECORDS,
    MAX_RECORDS_PER_PEER,
    PeerRecord,
    RecordError,
    catalog_key,
    decode_set,
    encode_chunks,
    encode_set,
    merge,
    record_key,
)
from tests.dht_fixtures import REPO, DhtCluster, DhtProcess, dht_cluster, new_network_id, wait_for

PUBLISHER = Identity(bytes(range(32)))
OTHER = Identity(bytes([7] * 32))


def make_record(identity: Identity = PUBLISHER, **changes) -> PeerRecord:
    fields = {
        "network_id": "net",
        "model_id": "tiny",
        "layers": (0, 4),
        "n_layers": 8,
        "address": "127.0.0.1:9000",
        "dht": "127.0.0.1:9001",
        "throughput": 12.5,
        "load": 1.0,
        "ttl": 120.0,
        **changes,
    }
    return PeerRecord.create(identity, **fields)


def content(model_id: str, layers: tuple[int, int] = (0, 8), address: str = "127.0.0.1:9000") -> dict:
    """What the node sends in a publish request."""
    return {
        "model_id": model_id,
        "layers": list(layers),
        "n_layers": 8,
        "address": address,
        "throughput": 5.0,
        "load": 0,
    }


# Records


def test_record_round_trip_keeps_a_valid_signature() -> None:
    record = make_record()
    again = PeerRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record
    assert again.valid("net")
    assert record.peer_id == PUBLISHER.peer_id
    assert record.expires - record.issued == 120.0


def test_tampered_foreign_and_stale_records_are_rejected() -> None:
    record = make_record()
    flipped = bytearray(record.signature)
    flipped[10] ^= 1
    assert not dataclasses.replace(record, signature=bytes(flipped)).valid("net")
    for change in (
        {"address": "10.0.0.9:9000"},
        {"layers": (0, 5)},
        {"throughput": 99.0},
        {"model_id": "other"},
        {"expires": record.expires + 1},
        {"public_key": OTHER.public_key},
    ):
        assert not dataclasses.replace(record, **change).valid("net"), change
    # Another key cannot publish under this peer id, even with its own valid signature.
    impostor = make_record(OTHER)
    assert not dataclasses.replace(impostor, peer_id=PUBLISHER.peer_id).valid("net")
    assert not record.valid("another-network")
    assert not make_record(now=time.time() - 200, ttl=120).valid("net")  # expired
    assert not make_record(now=time.time() + 600).valid("net")  # issued in the future
    assert not make_record(ttl=25 * 3600).valid("net")  # lives longer than 24 h
    assert make_record(now=time.time() + 30).valid("net")  # clock skew within a minute is fine


@pytest.mark.parametrize(
    "change",
    [
        {"layers": [4, 2]},
        {"layers": [0, 9]},
        {"layers": [-1, 2]},
        {"layers": ["0", 2]},
        {"layers": [0, 1, 2]},
        {"n_layers": True},
        {"n_layers": 0},
        {"public_key": "zz"},
        {"public_key": "ab" * 31},
        {"signature": "00" * 63},
        {"model_id": ""},
        {"model_id": "x" * 129},
        {"model_id": "caf\u00e9"},
        {"network_id": 5},
        {"address": "a\nb"},
        {"throughput": -1},
        {"throughput": "fast"},
        {"load": float("nan")},
        {"issued": None},
        {"peer_id": "ABC"},
    ],
)
def test_malformed_record_dicts_raise_record_error(change: dict) -> None:
    with pytest.raises(RecordError):
        PeerRecord.from_dict({**make_record().to_dict(), **change})


def test_record_dict_that_is_no_object_or_lacks_fields_raises() -> None:
    with pytest.raises(RecordError, match="object"):
        PeerRecord.from_dict([1, 2])
    raw = make_record().to_dict()
    del raw["dht"]
    with pytest.raises(RecordError, match="dht"):
        PeerRecord.from_dict(raw)


def test_merge_keeps_the_newest_record_per_publisher_and_range() -> None:
    now = time.time()
    old = make_record(now=now - 20, throughput=1.0)
    new = make_record(now=now - 10, throughput=2.0)
    other_range = make_record(now=now - 30, layers=(4, 8))
    other_peer = make_record(OTHER, now=now - 5)
    merged = merge([[old, other_range], [new, old], [other_peer]])
    assert merged == [other_peer, new, other_range]  # newest first


def test_merge_drops_invalid_records_and_other_networks() -> None:
    good = make_record()
    forged = dataclasses.replace(make_record(OTHER), throughput=1000.0)
    expired = make_record(OTHER, now=time.time() - 500, layers=(2, 3))
    foreign = make_record(OTHER, network_id="elsewhere", layers=(1, 3))
    assert merge([[good, forged, expired, foreign]], network_id="net") == [good]
    # Without a network id each record is checked against the network it names.
    assert set(merge([[good, forged, expired, foreign]])) == {good, foreign}


def test_merge_caps_records_per_key_and_per_publisher() -> None:
    now = time.time()
    many = [make_record(Identity.generate(), now=now - index) for index in range(MAX_RECORDS + 6)]
    merged = merge([many])
    assert merged == many[:MAX_RECORDS]
    ranges = [make_record(now=now - index, layers=(index, index + 1), n_layers=32) for index in range(12)]
    assert merge([ranges]) == ranges[:MAX_RECORDS_PER_PEER]


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        "",
        "not json",
        "{}",
        "[1, 2]",
        b"\xff\xfe\x00",
        None,
        42,
        "[" * 50_000,
        '[{"peer_id": 1}]',
        "x" * 300_000,
    ],
)
def test_decode_set_turns_garbage_into_nothing(garbage: object) -> None:
    assert decode_set(garbage) == []


def test_decode_set_drops_bad_entries_and_keeps_good_ones() -> None:
    good = make_record()
    raw = json.dumps([good.to_dict(), {"peer_id": "x"}, 17, {**good.to_dict(), "layers": [9, 1]}])
    assert decode_set(raw) == [good]
    assert decode_set(raw.encode()) == [good]


def test_encode_chunks_splits_a_set_into_bounded_pieces() -> None:
    records = [make_record(Identity.generate()) for _ in range(20)]
    chunks = encode_chunks(records, 3000)
    assert len(chunks) > 1
    assert all(len(chunk) <= 3000 for chunk in chunks)
    assert [record for chunk in chunks for record in decode_set(chunk)] == records
    assert decode_set(encode_set(records)) == records


def test_storage_merges_stores_and_ignores_forgeries() -> None:
    storage = RecordStorage()
    key = digest(record_key("net", "tiny"))
    mine, theirs = make_record(now=time.time() - 10), make_record(OTHER)
    storage[key] = encode_set([mine])
    storage[key] = encode_set([theirs])
    assert set(decode_set(storage[key])) == {mine, theirs}
    newer = make_record(throughput=50.0)
    forged = dataclasses.replace(make_record(OTHER, layers=(4, 8)), load=0.0)
    misfiled = make_record(OTHER, model_id="another-model", layers=(1, 2))
    for value in (encode_set([forged]), encode_set([misfiled]), "garbage", 12, encode_set([newer])):
        storage[key] = value
    assert set(decode_set(storage[key])) == {newer, theirs}
    assert storage.get(digest(record_key("net", "unknown"))) is None


def test_the_catalog_key_takes_every_model_of_its_network_only() -> None:
    storage = RecordStorage()
    catalog = digest(catalog_key("net"))
    tiny, other_model = make_record(), make_record(OTHER, model_id="another-model")
    storage[catalog] = encode_set([tiny, other_model])
    storage[catalog] = encode_set([make_record(OTHER, network_id="elsewhere", model_id="third")])
    assert set(decode_set(storage[catalog])) == {tiny, other_model}
    storage[digest(catalog_key("elsewhere"))] = encode_set([tiny])  # filed under another network's
    assert storage.get(digest(catalog_key("elsewhere"))) is None


# Invite codes

INVITE = Invite(host="192.168.1.20", port=4242, public_key=PUBLISHER.public_key, network_id="home")


def test_invite_round_trip() -> None:
    code = INVITE.encode()
    assert code.startswith("swarm://")
    assert Invite.parse(code) == INVITE
    assert Invite.parse(f"  {code}\n") == INVITE  # pasted with whitespace
    assert Invite.parse(code).peer_id == PUBLISHER.peer_id
    longest = Invite("h" * 253, 65535, OTHER.public_key, "n" * 64)
    assert len(longest.encode()) <= MAX_CODE_CHARS
    assert Invite.parse(longest.encode()) == longest


def _code(body: bytes, checksum: bytes | None = None) -> str:
    checksum = libnacl.crypto_generichash(body)[:4] if checksum is None else checksum
    return "swarm://" + base64.urlsafe_b64encode(body + checksum).decode().rstrip("=")


def _body(version: int = 1, port: int = 4242, host: bytes = b"10.0.0.1", network: bytes = b"home") -> bytes:
    return (
        struct.pack(">B32sH", version, PUBLISHER.public_key, port)
        + bytes([len(host)])
        + host
        + bytes([len(network)])
        + network
    )


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("http://example.com", "starts with swarm://"),
        ("AbCd", "starts with swarm://"),
        ("swarm://abc$def", "not valid base64url"),
        ("swarm://abcde", "not valid base64url"),
        ("swarm://", "empty"),
        (_code(_body(version=2)), "version 2"),
        (_code(_body(version=2), checksum=b"\0\0\0\0"), "damaged"),  # a damaged first character
        ("swarm://zz", "damaged"),
        (_code(_body())[:-8], "truncated"),
        ("swarm://AQ", "truncated"),
        (_code(_body(), checksum=b"\0\0\0\0"), r"damaged \(checksum mismatch\): copy it again"),
        (_code(_body() + b"!"), "extra bytes"),
        (_code(_body(port=0)), "invalid port 0"),
        (_code(_body(host=b"")), "names no host"),
        (_code(_body(network=b"")), "names no network"),
        (_code(_body(host=b"\xff\xfe")), "not UTF-8"),
        ("swarm://" + "A" * 600, "too long"),
    ],
)
def test_malformed_invite_codes_say_what_is_wrong(code: str, message: str) -> None:
    with pytest.raises(InviteError, match=message):
        Invite.parse(code)


def test_a_damaged_character_is_caught_by_the_checksum() -> None:
    body = bytearray(_body())
    body[40] ^= 0x20  # one byte of the host changes in copying
    damaged = _code(bytes(body), checksum=libnacl.crypto_generichash(_body())[:4])
    with pytest.raises(InviteError, match="checksum mismatch"):
        Invite.parse(damaged)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_").map(
            "swarm://".__add__
        ),
        st.binary(max_size=400).map(
            lambda data: "swarm://" + base64.urlsafe_b64encode(data).decode().rstrip("=")
        ),
        st.binary(min_size=1, max_size=120).map(lambda data: _code(b"\x01" + data)),
    )
)
def test_any_string_parses_or_raises_invite_error(code: str) -> None:
    try:
        invite = Invite.parse(code)
    except InviteError:
        return
    assert Invite.parse(invite.encode()) == invite


# Peer cache


def test_peer_cache_keeps_the_most_recent_200_per_network(tmp_path: Path) -> None:
    cache = PeerCache(tmp_path)
    peers = [
        CachedPeer(
            f"peer{index:03d}",
            "127.0.0.1",
            1000 + index,
            "a" if index % 3 else "b",
            1000.0 + index,
            "contact",
        )
        for index in range(250)
    ]
    cache.remember_many(peers[:120])
    cache.remember_many(peers[120:])
    kept = peers[-MAX_ROWS:]
    assert cache.recent("a") == sorted((p for p in kept if p.network_id == "a"), key=lambda p: -p.last_seen)
    assert (
        cache.recent("b", limit=5)
        == sorted((p for p in kept if p.network_id == "b"), key=lambda p: -p.last_seen)[:5]
    )
    assert len(cache.recent("a")) + len(cache.recent("b")) == MAX_ROWS
    cache.remember("peer000", "10.0.0.1", 7, "a", "exchange")  # seen again: now the newest
    again = PeerCache(tmp_path).recent("a")[0]
    assert (again.peer_id, again.host, again.port) == ("peer000", "10.0.0.1", 7)


# DHT processes


def test_dht_process_never_imports_jax_or_numpy() -> None:
    code = (
        "import sys, swarm.dht, swarm.dht_client\n"
        "print(sorted(name for name in ('jax', 'numpy') if name in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, timeout=60, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_client_without_a_dht_process_raises_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DhtUnavailable, match=str(tmp_path / "dht.sock")):
        DhtClient(tmp_path).status()


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[DhtProcess]]:
    """Three DHT processes of one network: the second and third bootstrapped from the first."""
    network = new_network_id()
    with dht_cluster(tmp_path_factory.mktemp("trio")) as cluster:
        first = cluster.start(network)
        rest = [cluster.start(network, bootstrap=[first.address], wait=False) for _ in range(2)]
        trio = [first, *(process.wait_ready() for process in rest)]
        yield [process.wait_contacts(2) for process in trio]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[DhtCluster]:
    with dht_cluster(tmp_path) as cluster:
        yield cluster


def publishers(process: DhtProcess, model_id: str) -> set[str]:
    return {record.peer_id for record in process.client.lookup(model_id)}


@pytest.mark.integration
def test_lookup_sees_every_publisher_with_valid_signatures(trio: list[DhtProcess]) -> None:
    first, second, third = trio
    assert first.client.publish([content("model-a", (0, 4), "127.0.0.1:7001")]) == 1
    assert second.client.publish([content("model-a", (4, 8), "127.0.0.1:7002")]) == 1
    records = third.client.lookup("model-a")
    assert {record.peer_id for record in records} == {first.peer_id, second.peer_id}
    assert all(record.valid(first.network_id) for record in records)
    assert {(record.address, record.layers, record.dht) for record in records} == {
        ("127.0.0.1:7001", (0, 4), first.address),
        ("127.0.0.1:7002", (4, 8), second.address),
    }
    assert third.client.lookup("model-nobody-serves") == []
    # Every publication is in the network's catalog too, whatever its model.
    assert third.client.publish([content("model-b", (0, 8), "127.0.0.1:7003")]) == 1
    catalog = first.client.catalog()
    assert {(record.peer_id, record.model_id) for record in catalog} == {
        (first.peer_id, "model-a"),
        (second.peer_id, "model-a"),
        (third.peer_id, "model-b"),
    }
    assert all(record.valid(first.network_id) for record in catalog)
    # What the catalog taught is among the peers' records (the dashboard's models page).
    peers = {peer["peer_id"]: peer for peer in first.client.peers()}
    assert [record["model_id"] for record in peers[third.peer_id]["records"]] == ["model-b"]
    assert third.client.publish([]) == 0
    # A new publication replaces the old one: the range it drops is no longer republished.
    status = first.client.status()
    assert status["published"] == [content("model-a", (0, 4), "127.0.0.1:7001")]
    assert (status["peer_id"], status["dht"], status["contacts"]) == (first.peer_id, first.address, 2)
    assert status["mdns"] is False


@pytest.mark.integration
def test_socket_api_answers_bad_requests_and_keeps_serving(trio: list[DhtProcess]) -> None:
    assert stat.S_IMODE(os.stat(trio[0].data_dir / "dht.sock").st_mode) == 0o600
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(10)
        connection.connect(str(trio[0].data_dir / "dht.sock"))
        stream = connection.makefile("rwb")
        for line, error in (
            (b"this is not json", "malformed JSON"),
            (b"[1, 2]", "JSON object"),
            (b'{"op": "fly"}', "unknown op 'fly'"),
            (b'{"op": "publish", "records": "many"}', "records must be a list"),
            (b'{"op": "publish", "records": [{"model_id": "m"}]}', "lacks layers"),
            (
                b'{"op": "publish", "records": [{"model_id": "m", "layers": [3, 1], "n_layers": 4, '
                b'"address": "h:1", "throughput": 1, "load": 0}]}',
                "layers",
            ),
            (b'{"op": "lookup"}', "model_id"),
            (b'{"op": "bootstrap", "addresses": ["nonsense"]}', "host:port"),
            (b'{"op": "bootstrap", "code": "swarm://zzz"}', "invite code"),
        ):
            stream.write(line + b"\n")
            stream.flush()
            reply = json.loads(stream.readline())
            assert reply["ok"] is False and error in reply["error"], (line, reply)
        stream.write(b'{"op": "status"}\n{"op": "peers"}\n')
        stream.flush()
        assert json.loads(stream.readline())["peer_id"] == trio[0].peer_id
        assert len(json.loads(stream.readline())["peers"]) == 2
    with pytest.raises(DhtError, match="another network"):
        code = Invite("127.0.0.1", 9, OTHER.public_key, "another network").encode()
        trio[0].client.bootstrap(code=code)


def _with_plain_node(address: str, action):
    """`await action(server)` with a plain kademlia node (no record checks, no hello) joined
    to the DHT through `address`; the node leaves afterwards."""

    async def run():
        server = Server()
        await server.listen(0, "127.0.0.1")
        try:
            host, port = address.rsplit(":", 1)
            await server.bootstrap([(host, int(port))])
            return await action(server)
        finally:
            server.stop()

    return asyncio.run(run())


@pytest.mark.integration
def test_forged_and_misfiled_record_sets_are_ignored(cluster: DhtCluster) -> None:
    network = new_network_id()
    first = cluster.start(network)
    second = cluster.start(network, bootstrap=[first.address]).wait_contacts(1)
    first.client.publish([content("model-f")])
    genuine = second.client.lookup("model-f")
    assert [record.peer_id for record in genuine] == [first.peer_id]
    attacker = Identity.generate()
    forged = dataclasses.replace(genuine[0], address="6.6.6.6:666")  # the publisher's signature, changed
    resigned = dataclasses.replace(
        make_record(attacker, network_id=network, model_id="model-f"), peer_id=first.peer_id
    )
    foreign = make_record(attacker, network_id="other-network", model_id="model-f")
    stale = make_record(attacker, network_id=network, model_id="model-f", now=time.time() - 1000)
    values = [encode_set([forged]), encode_set([resigned]), encode_set([foreign]), encode_set([stale]), "[{]"]

    async def forge(server: Server):
        stored = [await server.set(record_key(network, "model-f"), value) for value in values]
        # The plain node keeps the forgeries as they are and serves them to lookups meanwhile.
        return stored, await asyncio.to_thread(second.client.lookup, "model-f")

    stored, found = _with_plain_node(first.address, forge)
    assert all(stored)
    assert found == genuine
    assert first.client.lookup("model-f") == genuine


@pytest.mark.integration
def test_peer_exchange_shares_verified_peers_of_the_asked_network(trio: list[DhtProcess]) -> None:
    first, second, third = trio

    async def ask(server: Server):
        ours = await server.protocol.exchange(_address(first), server.node.id, first.network_id)
        theirs = await server.protocol.exchange(_address(first), server.node.id, "another-network")
        return ours, theirs

    (answered, ours), (_, theirs) = _with_plain_node(first.address, ask)
    assert answered and ours["network_id"] == first.network_id
    shared = {
        base64.b32encode(bytes.fromhex(node_id)).decode().lower(): f"{host}:{port}"
        for host, port, node_id in ours["peers"]
    }
    assert shared == {second.peer_id: second.address, third.peer_id: third.address}
    assert theirs["peers"] == []


@pytest.mark.integration
def test_garbage_datagrams_do_not_hurt_the_dht(trio: list[DhtProcess]) -> None:
    first, second, _ = trio
    second.client.publish([content("model-g")])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for datagram in (
            b"",
            b"\x00" * 30,
            b"\x00" + bytes(20) + b"\xc1\xc1",
            b"\x00" + bytes(20) + b"\x92\xa4ping\x90",
            b"\x00" + bytes(20) + b"\x92\xa5store\x93\x01\x02\x03",
            b"\x01" + bytes(40),
            bytes(range(256)),
        ):
            sender.sendto(datagram, _address(first))
    assert publishers(first, "model-g") == {second.peer_id}
    assert first.client.status()["contacts"] >= 2


def _address(process: DhtProcess) -> tuple[str, int]:
    host, port = process.address.rsplit(":", 1)
    return host, int(port)


@pytest.mark.integration
def test_another_network_in_the_same_dht_stays_invisible(trio: list[DhtProcess], cluster: DhtCluster) -> None:
    first, second, _ = trio
    first.client.publish([content("model-s", (0, 4))])
    second.client.publish([content("model-s", (4, 8))])
    stranger = cluster.start(new_network_id(), bootstrap=[first.address]).wait_contacts(3)
    stranger.client.publish([content("model-s", (0, 8), "127.0.0.1:7666")])
    wait_for(
        lambda: publishers(stranger, "model-s") == {stranger.peer_id}, 10, "the stranger to find its record"
    )
    for process in trio:
        assert publishers(process, "model-s") == {first.peer_id, second.peer_id}
    assert stranger.peer_id in first.peer_ids()  # it is in the DHT, just not in the network


@pytest.mark.integration
def test_a_node_joining_with_an_invite_is_seen_and_found(trio: list[DhtProcess], cluster: DhtCluster) -> None:
    first, second, third = trio
    code = first.client.invite()
    invite = Invite.parse(code)
    assert (f"{invite.host}:{invite.port}", invite.network_id, invite.peer_id) == (
        first.address,
        first.network_id,
        first.peer_id,
    )
    started = time.monotonic()
    joiner = cluster.start(first.network_id, join=[code])
    for process in (first, second, third):
        wait_for(lambda process=process: joiner.peer_id in process.peer_ids(), 10, "the joiner in peers")
    joiner.client.publish([content("model-j")])
    for process in (second, third):
        wait_for(lambda process=process: publishers(process, "model-j") == {joiner.peer_id}, 10, "its record")
    assert time.monotonic() - started < 20
    via_invite = {peer["peer_id"]: peer for peer in joiner.client.peers()}[first.peer_id]
    assert via_invite["source"] == "invite" and via_invite["verified"] is True
    assert via_invite["latency_ms"] is not None
    assert joiner.stop() == 0
    assert not (joiner.data_dir / "dht.sock").exists()


@pytest.mark.integration
def test_an_invite_from_an_impostor_is_refused(trio: list[DhtProcess], cluster: DhtCluster) -> None:
    host, port = trio[0].address.rsplit(":", 1)
    fake = Invite(host, int(port), OTHER.public_key, trio[0].network_id).encode()  # right address, wrong key
    joiner = cluster.start(trio[0].network_id, join=[fake])
    wait_for(
        lambda: f"is {trio[0].peer_id}, not {Invite.parse(fake).peer_id} as expected" in joiner.log(),
        10,
        "the warning",
    )
    # The peer at that address may still reach the joiner as an ordinary DHT contact, but the
    # joiner never takes it for the inviting peer.
    assert all(peer["source"] != "invite" for peer in joiner.client.peers())


@pytest.mark.integration
def test_a_restarted_node_rejoins_through_its_peer_cache(cluster: DhtCluster) -> None:
    network = new_network_id()
    first = cluster.start(network)
    second = cluster.start(network, bootstrap=[first.address]).wait_contacts(1)
    wait_for(
        lambda: first.peer_id in {peer.peer_id for peer in PeerCache(second.data_dir).recent(network)},
        10,
        "the cache",
    )
    assert second.stop() == 0
    again = DhtProcess(second.data_dir, network)  # same data dir, no bootstrap peers
    cluster.processes.append(again)
    again.wait_ready().wait_contacts(1)
    assert {peer["peer_id"]: peer["source"] for peer in again.client.peers()} == {first.peer_id: "cache"}
    wait_for(lambda: again.address in {peer["dht"] for peer in first.client.peers()}, 10, "its new address")


@pytest.mark.integration
def test_twenty_nodes_find_every_publisher(cluster: DhtCluster) -> None:
    network, rng = new_network_id(), random.Random(20)
    nodes = [cluster.start(network)]
    for wave in (3, 6, 10):
        started = [
            cluster.start(
                network,
                wait=False,
                bootstrap=[node.address for node in rng.sample(nodes, min(len(nodes), rng.choice((1, 2))))],
            )
            for _ in range(wave)
        ]
        nodes += [process.wait_ready() for process in started]
    for node in nodes:
        node.wait_contacts(3)
    models = [f"model-{index}" for index in range(5)]
    expected = {
        model: {node.peer_id for index, node in enumerate(nodes) if index % 5 == m}
        for m, model in enumerate(models)
    }
    with ThreadPoolExecutor(8) as pool:
        published = list(
            pool.map(lambda pair: pair[1].client.publish([content(models[pair[0] % 5])]), enumerate(nodes))
        )
        assert published == [1] * 20
        answers = list(
            pool.map(
                lambda job: publishers(job[0], job[1]) == expected[job[1]],
                [(n, m) for n in nodes for m in models],
            )
        )
    success = sum(answers) / len(answers)
    print(f"20-node lookups returning every publisher: {sum(answers)}/{len(answers)}")
    assert success >= 0.99


@pytest.mark.integration
def test_mdns_finds_a_lan_peer_without_bootstrap(cluster: DhtCluster) -> None:
    network = new_network_id()
    first, second = (cluster.start(network, mdns=True) for _ in range(2))
    wait_for(
        lambda: second.peer_id in first.peer_ids() and first.peer_id in second.peer_ids(),
        20,
        "mDNS discovery",
    )
    found = {peer["peer_id"]: peer for peer in second.client.peers()}[first.peer_id]
    seen = {peer["peer_id"]: peer for peer in first.client.peers()}[second.peer_id]
    assert (found["dht"], seen["dht"]) == (first.address, second.address)
    assert "mdns" in (found["source"], seen["source"])  # whoever heard the other first
    assert second.client.status()["mdns"] is True


def test_offline_mode_reaches_lan_peers_only(cluster: DhtCluster) -> None:
    network = new_network_id()
    remote = cluster.start(network)  # mDNS off: reachable by address only, as a peer off the LAN
    lan = cluster.start(network, mdns=True)
    offline = cluster.start(network, bootstrap=[remote.address], settings={"SWARM_POOL_OFFLINE_MODE": "true"})
    wait_for(lambda: lan.peer_id in offline.peer_ids(), 20, "the LAN peer found by mDNS")
    assert offline.client.status()["mdns"] is True  # offline mode turns mDNS on
    time.sleep(2)
    assert remote.peer_id not in offline.peer_ids()  # its bootstrap peer was never contacted
    with pytest.raises(DhtError, match="offline mode"):
        offline.client.bootstrap([remote.address])


def test_a_config_reload_signal_does_not_stop_the_dht(cluster: DhtCluster) -> None:
    process = cluster.start(new_network_id())
    process.process.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert process.process.poll() is None
    assert process.client.status()["peer_id"] == process.peer_id
