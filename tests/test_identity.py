"""Identity: the key file's creation and checks, peer ids, signatures, sealed boxes."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest

from swarm import identity as identity_module
from swarm.errors import SwarmError
from swarm.identity import (
    SEAL_OVERHEAD_BYTES,
    Identity,
    IdentityError,
    SealError,
    peer_id_of,
    seal_to,
    verify,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_run_creates_a_private_key_file_and_later_runs_reload_it(tmp_path: Path):
    data_dir = tmp_path / "data" / "swarm"  # does not exist yet
    first = Identity.load_or_create(data_dir)
    key_file = data_dir / "identity.key"
    assert _mode(key_file) == 0o600
    assert key_file.stat().st_size == 32
    assert _mode(data_dir) == 0o700
    again = Identity.load_or_create(data_dir)
    assert again.public_key == first.public_key
    assert again.peer_id == first.peer_id
    assert [p.name for p in data_dir.iterdir()] == ["identity.key"], "no temporary file is left behind"


def test_key_file_is_never_readable_by_others_even_with_an_open_umask(tmp_path: Path, monkeypatch):
    modes_before_link = []
    real_link = os.link

    def checking_link(source, destination):
        modes_before_link.append(stat.S_IMODE(os.stat(source).st_mode))
        return real_link(source, destination)

    monkeypatch.setattr(identity_module.os, "link", checking_link)
    old_umask = os.umask(0)
    try:
        Identity.load_or_create(tmp_path)
    finally:
        os.umask(old_umask)
    assert modes_before_link == [0o600]
    assert _mode(tmp_path / "identity.key") == 0o600


def test_processes_starting_together_agree_on_one_identity(tmp_path: Path):
    barrier = threading.Barrier(6)
    keys = []

    def start() -> None:
        barrier.wait(timeout=5)
        keys.append(Identity.load_or_create(tmp_path).public_key)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    assert len(keys) == 6 and len(set(keys)) == 1


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_key_file_others_can_access_is_refused(tmp_path: Path, mode: int):
    key_file = tmp_path / "identity.key"
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(mode)
    with pytest.raises(IdentityError, match=r"accessible by group or others .*chmod 600"):
        Identity.load_or_create(tmp_path)
    assert key_file.stat().st_size == 32, "the refused key is left as it was"


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_a_malformed_key_file_is_refused(tmp_path: Path, size: int):
    key_file = tmp_path / "identity.key"
    key_file.write_bytes(b"\x07" * size)
    key_file.chmod(0o600)
    with pytest.raises(IdentityError, match="malformed: expected a 32-byte Ed25519 seed"):
        Identity.load_or_create(tmp_path)


def test_a_directory_in_place_of_the_key_file_is_refused(tmp_path: Path):
    (tmp_path / "identity.key").mkdir(mode=0o700)
    with pytest.raises(IdentityError, match="not a regular file"):
        Identity.load_or_create(tmp_path)


def test_identity_errors_are_user_errors():
    assert issubclass(IdentityError, SwarmError) and issubclass(SealError, SwarmError)


def test_peer_id_is_short_printable_and_derived_from_the_public_key():
    identity = Identity(bytes(range(32)))
    digest = hashlib.blake2b(identity.public_key, digest_size=32).digest()[:20]
    expected = base64.b32encode(digest).decode().rstrip("=").lower()
    assert identity.peer_id == expected == peer_id_of(identity.public_key)
    assert identity.peer_id == "tusof3vpe7bkbcffmsrs7qb2raw43gae"  # the format is part of the protocol
    assert Identity(bytes(range(32))).peer_id == identity.peer_id
    assert Identity.generate().peer_id != identity.peer_id
    assert identity.peer_id in repr(identity) and bytes(range(32)).hex() not in repr(identity)


def test_signatures_verify_only_for_the_signer_and_the_signed_bytes():
    signer, other = Identity.generate(), Identity.generate()
    signature = signer.sign(b"record v1")
    assert len(signature) == 64
    assert verify(signer.public_key, b"record v1", signature)
    assert not verify(signer.public_key, b"record v2", signature)
    assert not verify(other.public_key, b"record v1", signature)
    assert not verify(signer.public_key, b"record v1", signature[:-1] + bytes([signature[-1] ^ 1]))
    assert not verify(signer.public_key, b"record v1", signature[:63])
    assert not verify(signer.public_key[:31], b"record v1", signature)
    assert not verify(signer.public_key, "record v1", signature)  # type: ignore[arg-type]


def test_sealed_box_opens_only_for_its_recipient():
    requester, last_stage, middle_stage = Identity.generate(), Identity.generate(), Identity.generate()
    sealed = seal_to(requester.public_key, b"token 1234")
    assert len(sealed) == len(b"token 1234") + SEAL_OVERHEAD_BYTES
    assert b"token 1234" not in sealed
    assert requester.open_sealed(sealed) == b"token 1234"
    assert seal_to(requester.public_key, b"token 1234") != sealed, "each seal uses a fresh ephemeral key"
    for outsider in (last_stage, middle_stage):
        with pytest.raises(SealError, match="not sealed to this identity"):
            outsider.open_sealed(sealed)


def test_a_damaged_sealed_box_is_refused():
    requester = Identity.generate()
    sealed = seal_to(requester.public_key, b"payload")
    for damaged in (sealed[:-1] + bytes([sealed[-1] ^ 0x80]), sealed[:20], b"", sealed + b"\x00"):
        with pytest.raises(SealError):
            requester.open_sealed(damaged)


def test_sealing_to_a_bad_public_key_is_refused():
    with pytest.raises(SealError, match="31 bytes, not 32"):
        seal_to(b"\x01" * 31, b"x")
    with pytest.raises(SealError, match="not a valid Ed25519 key"):
        seal_to(b"\xff" * 32, b"x")
