"""Secure channel over loopback: handshake, echo, and what an on-path attacker cannot do.

An attacker is a `Relay` between client and server that sees every record the client
sends (0: hello, 1: signature, 2 on: data frames) and may rewrite, repeat, reorder or
drop them. Every blocking call has a timeout of a few seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from swarm.errors import SwarmError
from swarm.identity import Identity
from swarm.secure_channel import (
    CLIENT,
    MAX_COUNTER,
    ChannelClosedError,
    ChannelError,
    ChannelTimeout,
    FrameCipher,
    HandshakeError,
    HandshakeTimeout,
    Hello,
    SecureChannel,
)

NETWORK = "swarm-test"
TIMEOUT = 5.0

Rewrite = Callable[[int, bytes], list[bytes]]


class Background:
    """Runs `function` on a thread; `result()` joins it and returns or raises what it did."""

    def __init__(self, function: Callable[[], object]) -> None:
        self._value: object = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function: Callable[[], object]) -> None:
        try:
            self._value = function()
        except BaseException as error:
            self._error = error

    def result(self, timeout: float = TIMEOUT):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background call did not finish in time"
        if self._error is not None:
            raise self._error
        return self._value


def _recv_exact(sock: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _read_record(sock: socket.socket) -> bytes:
    header = _recv_exact(sock, 4)
    assert header is not None
    body = _recv_exact(sock, struct.unpack(">I", header)[0])
    assert body is not None
    return header + body


def _hang_up(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


class Relay:
    """An on-path attacker between one client and the server at `target`."""

    def __init__(self, target: tuple[str, int], rewrite: Rewrite | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.address = self.listener.getsockname()
        self.records: list[bytes] = []
        self._target = target
        self._rewrite = rewrite or (lambda index, record: [record])
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._run, daemon=True)]
        self._threads[0].start()

    def _run(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = socket.create_connection(self._target, timeout=TIMEOUT)
        client.settimeout(TIMEOUT)
        self._sockets += [client, server]
        back = threading.Thread(target=self._copy, args=(server, client), daemon=True)
        self._threads.append(back)
        back.start()
        self._forward(client, server)

    def _forward(self, source: socket.socket, sink: socket.socket) -> None:
        index = 0
        try:
            while (header := _recv_exact(source, 4)) is not None:
                body = _recv_exact(source, struct.unpack(">I", header)[0])
                if body is None:
                    break
                self.records.append(header + body)
                for chunk in self._rewrite(index, header + body):
                    sink.sendall(chunk)
                index += 1
        except OSError:
            pass
        finally:
            _hang_up(sink)

    def _copy(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(1 << 16):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            _hang_up(sink)

    def close(self) -> None:
        for sock in [self.listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(TIMEOUT)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + TIMEOUT
    while (extra := set(threading.enumerate()) - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not extra, f"threads left running: {extra}"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(TIMEOUT)
    yield sock
    sock.close()


@pytest.fixture
def channels() -> Iterator[list[SecureChannel]]:
    """Channels a test opens; all are closed after it."""
    opened: list[SecureChannel] = []
    yield opened
    for channel in opened:
        channel.close()


def serve_one(
    listener: socket.socket, identity: Identity, network_id: str = NETWORK, **options
) -> Background:
    def accept() -> SecureChannel:
        sock, _ = listener.accept()
        return SecureChannel.accept(
            sock, identity, network_id, timeout=options.pop("timeout", TIMEOUT), **options
        )

    return Background(accept)


def connect_pair(
    listener: socket.socket,
    channels: list[SecureChannel],
    *,
    via: Relay | None = None,
    server_options: dict | None = None,
) -> tuple[SecureChannel, SecureChannel, Identity, Identity]:
    server_identity, client_identity = Identity.generate(), Identity.generate()
    pending = serve_one(listener, server_identity, **(server_options or {}))
    address = via.address if via else listener.getsockname()
    client = SecureChannel.connect(address, client_identity, NETWORK, timeout=TIMEOUT)
    channels.append(client)
    server = pending.result()
    channels.append(server)
    return client, server, client_identity, server_identity


def test_handshake_authenticates_both_sides_and_echoes_both_ways(listener, channels):
    server_identity, client_identity = Identity.generate(), Identity.generate()
    pending = serve_one(listener, server_identity)
    client = SecureChannel.connect(
        listener.getsockname(),
        client_identity,
        NETWORK,
        expected_peer=server_identity.public_key,
        timeout=TIMEOUT,
    )
    channels.append(client)
    server = pending.result()
    channels.append(server)
    assert client.peer_public_key == server_identity.public_key
    assert client.peer_id == server_identity.peer_id
    assert server.peer_public_key == client_identity.public_key
    for payload in (b"", b"hello", os.urandom(1 << 20)):
        client.send(payload)
        assert server.recv() == payload
        server.send(payload[::-1])
        assert client.recv() == payload[::-1]


def test_payloads_are_encrypted_on_the_wire(listener, channels):
    with Relay(listener.getsockname()) as relay:
        client, server, _, _ = connect_pair(listener, channels, via=relay)
        secret = b"the hidden states of a private prompt"
        client.send(secret)
        assert server.recv() == secret
        client.send(secret)
        assert server.recv() == secret
        frames = relay.records[2:]
        assert len(frames) == 2
        assert all(secret not in frame for frame in frames)
        assert frames[0] != frames[1], "each frame has its own nonce"
        assert all(len(frame) == 4 + len(secret) + 16 for frame in frames)


def test_both_directions_run_at_once(listener, channels):
    client, server, _, _ = connect_pair(listener, channels)
    count = 200

    def send_all(channel: SecureChannel, tag: bytes) -> None:
        for index in range(count):
            channel.send(tag + index.to_bytes(4, "big"))

    senders = [Background(lambda: send_all(client, b"c")), Background(lambda: send_all(server, b"s"))]
    from_client = [server.recv() for _ in range(count)]
    from_server = [client.recv() for _ in range(count)]
    for sender in senders:
        sender.result()
    assert from_client == [b"c" + i.to_bytes(4, "big") for i in range(count)]
    assert from_server == [b"s" + i.to_bytes(4, "big") for i in range(count)]


def _flip_ciphertext_byte(index: int, record: bytes) -> list[bytes]:
    if index != 2:
        return [record]
    return [record[:10] + bytes([record[10] ^ 0x01]) + record[11:]]


def _flip_tag_byte(index: int, record: bytes) -> list[bytes]:
    return [record[:-1] + bytes([record[-1] ^ 0x80])] if index == 2 else [record]


def _shorten_frame(index: int, record: bytes) -> list[bytes]:
    if index != 2:
        return [record]
    body = record[4:-1]
    return [struct.pack(">I", len(body)) + body]


def _replay_first_frame(index: int, record: bytes) -> list[bytes]:
    return [record, record] if index == 2 else [record]


def _drop_first_frame(index: int, record: bytes) -> list[bytes]:
    return [] if index == 2 else [record]


class _Swap:
    """Holds back the first data frame and sends it after the second."""

    def __init__(self) -> None:
        self.held = b""

    def __call__(self, index: int, record: bytes) -> list[bytes]:
        if index == 2:
            self.held = record
            return []
        if index == 3:
            return [record, self.held]
        return [record]


@pytest.mark.parametrize(
    "rewrite, delivered_first",
    [
        (_flip_ciphertext_byte, 0),
        (_flip_tag_byte, 0),
        (_shorten_frame, 0),
        (_replay_first_frame, 1),
        (_drop_first_frame, 0),
        (_Swap(), 0),
    ],
    ids=["tampered", "tampered-tag", "truncated", "replayed", "dropped", "reordered"],
)
def test_a_frame_altered_on_the_wire_closes_the_channel(listener, channels, caplog, rewrite, delivered_first):
    with Relay(listener.getsockname(), rewrite) as relay:
        client, server, client_identity, _ = connect_pair(listener, channels, via=relay)
        client.send(b"first")
        client.send(b"second")
        assert [server.recv() for _ in range(delivered_first)] == [b"first"][:delivered_first]
        with (
            caplog.at_level(logging.WARNING, logger="swarm.secure_channel"),
            pytest.raises(ChannelError, match="failed authentication") as raised,
        ):
            server.recv()
        assert not isinstance(raised.value, ChannelTimeout)
        assert server.closed
        assert any("closing channel to " + client_identity.peer_id in r.getMessage() for r in caplog.records)
        with pytest.raises(ChannelClosedError):
            server.recv()
        with pytest.raises(ChannelClosedError):
            client.recv()  # the server hung up


def test_an_oversized_length_prefix_is_refused_without_waiting_for_the_body(listener, channels):
    def claim_four_gigabytes(index: int, record: bytes) -> list[bytes]:
        return [b"\xff\xff\xff\xff"] if index == 2 else [record]

    with Relay(listener.getsockname(), claim_four_gigabytes) as relay:
        client, server, _, _ = connect_pair(listener, channels, via=relay)
        client.send(b"x")
        began = time.monotonic()
        with pytest.raises(ChannelError, match="4294967295 bytes exceeds the limit") as raised:
            server.recv(timeout=TIMEOUT)
        assert not isinstance(raised.value, ChannelTimeout)
        assert time.monotonic() - began < TIMEOUT / 2
        assert server.closed


def test_the_frame_limit_is_configurable(listener, channels):
    client, server, _, _ = connect_pair(listener, channels, server_options={"max_frame_bytes": 1024})
    client.send(b"a" * 1024)
    assert server.recv() == b"a" * 1024
    client.send(b"a" * 1025)
    with pytest.raises(ChannelError, match="1041 bytes exceeds the limit of 1040"):
        server.recv()


def test_sending_more_than_the_limit_is_refused_locally_and_keeps_the_channel(listener, channels):
    client, server, _, _ = connect_pair(listener, channels)
    client.max_frame_bytes = 16
    with pytest.raises(ChannelError, match="17 bytes exceeds the frame limit of 16"):
        client.send(b"b" * 17)
    assert not client.closed
    client.send(b"fits")
    assert server.recv() == b"fits"


def test_a_wrong_network_id_is_refused_on_both_sides_with_the_reason(listener):
    pending = serve_one(listener, Identity.generate(), network_id="swarm-main")
    with pytest.raises(
        HandshakeError, match="network id mismatch: peer is on 'swarm-main', this node on 'swarm-lab'"
    ):
        SecureChannel.connect(listener.getsockname(), Identity.generate(), "swarm-lab", timeout=TIMEOUT)
    with pytest.raises(HandshakeError, match="network id mismatch: peer is on 'swarm-lab'"):
        pending.result()


def test_an_unexpected_peer_is_refused(listener):
    server_identity, impostor_expected = Identity.generate(), Identity.generate()
    pending = serve_one(listener, server_identity)
    with pytest.raises(
        HandshakeError, match=f"peer is {server_identity.peer_id}, expected {impostor_expected.peer_id}"
    ):
        SecureChannel.connect(
            listener.getsockname(),
            Identity.generate(),
            NETWORK,
            expected_peer=impostor_expected.public_key,
            timeout=TIMEOUT,
        )
    with pytest.raises(HandshakeError, match="closed the connection during the handshake"):
        pending.result()


def test_an_unsupported_protocol_version_is_refused_with_the_reason(listener):
    pending = serve_one(listener, Identity.generate())
    hello = Hello(2, CLIENT, Identity.generate().public_key, os.urandom(32), NETWORK).encode()
    with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as sock:
        sock.sendall(struct.pack(">I", len(hello)) + hello)
        with pytest.raises(
            HandshakeError, match="unsupported channel protocol version 2 \\(this node speaks 1\\)"
        ):
            pending.result()


def test_a_peer_speaking_another_protocol_is_refused(listener):
    pending = serve_one(listener, Identity.generate())
    with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as sock:
        sock.sendall(b"\x00\x00\x00\x10GET / HTTP/1.1\r\n")
        with pytest.raises(HandshakeError, match="does not speak the swarm channel protocol"):
            pending.result()


def test_an_oversized_handshake_record_is_refused(listener):
    pending = serve_one(listener, Identity.generate())
    with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as sock:
        sock.sendall(b"\x7f\xff\xff\xff")
        with pytest.raises(HandshakeError, match="2147483647 bytes exceeds the limit of 512"):
            pending.result(timeout=1.0)


def test_a_signature_from_another_handshake_is_refused(listener, channels):
    server_identity, victim = Identity.generate(), Identity.generate()
    pending = serve_one(listener, server_identity)
    with Relay(listener.getsockname()) as relay:
        channels.append(SecureChannel.connect(relay.address, victim, NETWORK, timeout=TIMEOUT))
        channels.append(pending.result())
        victim_hello, victim_signature = relay.records[:2]

    # The attacker replays the victim's hello and signature to the same server.
    pending = serve_one(listener, server_identity)
    with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as attacker:
        attacker.sendall(victim_hello)
        _read_record(attacker)  # the server's hello, with a fresh ephemeral key
        attacker.sendall(victim_signature)
        with pytest.raises(HandshakeError, match=f"handshake signature from {victim.peer_id} is invalid"):
            pending.result()


def test_a_silent_peer_times_the_handshake_out(listener):
    pending = serve_one(listener, Identity.generate(), timeout=0.3)
    with socket.create_connection(listener.getsockname(), timeout=TIMEOUT):
        began = time.monotonic()
        with pytest.raises(HandshakeTimeout, match=r"timed out after 0\.3 s"):
            pending.result()
        assert time.monotonic() - began < TIMEOUT / 2


def test_connecting_to_a_closed_port_fails_clearly():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        address = probe.getsockname()
    with pytest.raises(ChannelError, match=f"cannot connect to 127.0.0.1:{address[1]}"):
        SecureChannel.connect(address, Identity.generate(), NETWORK, timeout=TIMEOUT)


def test_an_idle_receive_times_out_and_the_channel_stays_usable(listener, channels):
    client, server, _, _ = connect_pair(listener, channels)
    with pytest.raises(ChannelTimeout, match="no frame from"):
        server.recv(timeout=0.1)
    assert not server.closed
    client.send(b"later")
    assert server.recv() == b"later"


def test_a_frame_that_stops_half_way_times_out_and_closes_the_channel(listener, channels):
    def send_half(index: int, record: bytes) -> list[bytes]:
        return [record[: len(record) // 2]] if index == 2 else [record]

    with Relay(listener.getsockname(), send_half) as relay:
        client, server, _, _ = connect_pair(listener, channels, via=relay)
        client.send(b"x" * 100)
        with pytest.raises(ChannelTimeout, match="did not finish in time; channel closed"):
            server.recv(timeout=0.3)
        assert server.closed


def test_a_peer_hanging_up_is_reported_as_closed(listener, channels, caplog):
    client, server, _, _ = connect_pair(listener, channels)
    client.close()
    with (
        caplog.at_level(logging.WARNING, logger="swarm.secure_channel"),
        pytest.raises(ChannelClosedError, match=r"closed the connection$"),
    ):
        server.recv()
    assert not caplog.records  # hanging up between frames ends a session: nothing to warn of
    with pytest.raises(ChannelClosedError):
        client.send(b"too late")


@pytest.mark.parametrize("sent", [4, 12], ids=["length-only", "part-of-the-body"])
def test_a_peer_hanging_up_in_the_middle_of_a_frame_is_warned_of(listener, channels, caplog, sent):
    def cut(index: int, record: bytes) -> list[bytes]:
        return [record[:sent]] if index == 2 else [record]

    with Relay(listener.getsockname(), cut) as relay:
        client, server, client_identity, _ = connect_pair(listener, channels, via=relay)
        client.send(b"a frame cut short")
        client.close()
        with (
            caplog.at_level(logging.WARNING, logger="swarm.secure_channel"),
            pytest.raises(ChannelClosedError, match="closed the connection in the middle of a frame"),
        ):
            server.recv()
        assert any(
            "closing channel to " + client_identity.peer_id in r.getMessage()
            and "middle of a frame" in r.getMessage()
            for r in caplog.records
        )


def test_closing_wakes_a_blocked_receive(listener, channels):
    _, server, _, _ = connect_pair(listener, channels)
    receiving = Background(lambda: server.recv(timeout=TIMEOUT))
    time.sleep(0.1)
    began = time.monotonic()
    server.close()
    with pytest.raises(ChannelClosedError):
        receiving.result()
    assert time.monotonic() - began < TIMEOUT / 2


def test_counter_exhaustion_closes_the_channel(listener, channels):
    client, _, _, _ = connect_pair(listener, channels)
    client._send_cipher._counter = MAX_COUNTER + 1
    with pytest.raises(ChannelError, match="counter exhausted"):
        client.send(b"one too many")
    assert client.closed


def test_frame_nonces_count_per_direction_and_the_last_counter_is_usable():
    key = os.urandom(32)
    sender, receiver = FrameCipher(key), FrameCipher(key)
    sender._counter = receiver._counter = MAX_COUNTER
    frame = sender.seal(b"last")
    assert receiver.open(frame[:4], frame[4:]) == b"last"
    with pytest.raises(ChannelError, match="counter exhausted"):
        sender.seal(b"after")


def test_channel_errors_are_user_errors():
    assert issubclass(HandshakeError, ChannelError) and issubclass(ChannelError, SwarmError)
    assert issubclass(HandshakeTimeout, ChannelTimeout)
