"""A node's identity: its Ed25519 key, peer id, signatures and sealed boxes.

Owns `identity.key` in the data dir (a raw 32-byte Ed25519 seed, mode 0600) and every
operation on the identity key: signing, verifying, and sealing messages to a peer's
identity so that only that peer can read them (the last pipeline stage seals the sampled
token to the requester; the stages in between cannot open it).

Peer id format: the RFC 4648 base32 encoding, lowercase and unpadded, of the first 20
bytes of BLAKE2b-256(public key): 32 characters from `a-z2-7`, e.g.
`"3n4ahnj5t2pqd5zmy4ukmtxkmz6ryb6q"`.

All primitives come from libsodium through libnacl. Sealing reuses the identity key: the
Ed25519 keys are mapped to X25519 (`crypto_sign_ed25519_{pk,sk}_to_curve25519`) and
`crypto_box_seal` is used, as libsodium documents for one key pair serving both. A sealed
box hides its content from everyone but the recipient; it does not prove who sealed it.

Imports only the standard library and libnacl: never jax or numpy.
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import libnacl

from swarm.errors import SwarmError

PUBLIC_KEY_BYTES = libnacl.crypto_sign_PUBLICKEYBYTES  # 32
SIGNATURE_BYTES = libnacl.crypto_sign_BYTES  # 64
SEED_BYTES = libnacl.crypto_sign_SEEDBYTES  # 32
SEAL_OVERHEAD_BYTES = libnacl.crypto_box_SEALBYTES  # 48: ephemeral key + MAC
KEY_FILE_NAME = "identity.key"
PEER_ID_HASH_BYTES = 20


class IdentityError(SwarmError):
    """The identity key file is unsafe, malformed or cannot be written."""


class SealError(SwarmError):
    """A sealed box could not be made or opened (wrong recipient, tampered, malformed)."""


def peer_id_of(public_key: bytes) -> str:
    """The printable peer id of an Ed25519 public key (format in the module docstring)."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, not {len(public_key)}")
    digest = libnacl.crypto_generichash(bytes(public_key))[:PEER_ID_HASH_BYTES]
    return base64.b32encode(digest).decode("ascii").rstrip("=").lower()


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """Whether `signature` is `public_key`'s Ed25519 signature over `data`.

    Any malformed input (wrong lengths, not bytes) is simply an invalid signature.
    """
    try:
        public_key, data, signature = bytes(public_key), bytes(data), bytes(signature)
    except TypeError:
        return False
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        libnacl.crypto_sign_verify_detached(signature, data, public_key)
    except ValueError:
        return False
    return True


def seal_to(recipient_public_key: bytes, plaintext: bytes) -> bytes:
    """Seals `plaintext` so that only the holder of `recipient_public_key` can open it.

    The result is `SEAL_OVERHEAD_BYTES` longer than the plaintext (libsodium sealed box:
    a fresh ephemeral X25519 key and the XSalsa20-Poly1305 MAC).
    """
    if len(recipient_public_key) != PUBLIC_KEY_BYTES:
        raise SealError(f"recipient public key is {len(recipient_public_key)} bytes, not {PUBLIC_KEY_BYTES}")
    try:
        curve_public_key = libnacl.crypto_sign_ed25519_pk_to_curve25519(bytes(recipient_public_key))
    except (ValueError, libnacl.CryptError) as error:
        raise SealError("recipient public key is not a valid Ed25519 key") from error
    return libnacl.crypto_box_seal(bytes(plaintext), curve_public_key)


class Identity:
    """An Ed25519 key pair. The secret key never leaves this object except to disk."""

    __slots__ = ("_curve_secret_key", "_public_key", "_secret_key")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_BYTES:
            raise IdentityError(f"an Ed25519 seed is {SEED_BYTES} bytes, not {len(seed)}")
        self._public_key, self._secret_key = libnacl.crypto_sign_seed_keypair(bytes(seed))
        self._curve_secret_key: bytes | None = None

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity (not stored anywhere)."""
        return cls(libnacl.randombytes(SEED_BYTES))

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Identity:
        """Reads `data_dir/identity.key`, creating it (mode 0600) on first run.

        Refuses a key file that group or others may access, or that is not a 32-byte seed.
        Two processes starting at once agree on one identity: creation never overwrites.
        """
        path = Path(data_dir) / KEY_FILE_NAME
        try:
            return cls(_read_seed(path))
        except FileNotFoundError:
            pass
        try:
            return cls(_create_seed(path))
        except FileExistsError:
            # Another process created it between our read and our create.
            return cls(_read_seed(path))

    @property
    def public_key(self) -> bytes:
        """The 32-byte Ed25519 public key."""
        return self._public_key

    @property
    def peer_id(self) -> str:
        return peer_id_of(self._public_key)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature over `data`.

        Callers put a context string naming their purpose in front of what they sign, so
        a signature made for one purpose cannot be passed off as another.
        """
        return libnacl.crypto_sign_detached(bytes(data), self._secret_key)

    def open_sealed(self, ciphertext: bytes) -> bytes:
        """Opens a box made by `seal_to(self.public_key, ...)`; raises `SealError` otherwise."""
        ciphertext = bytes(ciphertext)
        if len(ciphertext) < SEAL_OVERHEAD_BYTES:
            raise SealError(
                f"sealed box of {len(ciphertext)} bytes is shorter than its {SEAL_OVERHEAD_BYTES}-byte overhead"
            )
        if self._curve_secret_key is None:
            self._curve_secret_key = libnacl.crypto_sign_ed25519_sk_to_curve25519(self._secret_key)
        curve_public_key = libnacl.crypto_sign_ed25519_pk_to_curve25519(self._public_key)
        try:
            return libnacl.crypto_box_seal_open(ciphertext, curve_public_key, self._curve_secret_key)
        except libnacl.CryptError as error:
            raise SealError("sealed box was not sealed to this identity or was altered") from error

    def __repr__(self) -> str:
        return f"Identity(peer_id={self.peer_id!r})"


def _read_seed(path: Path) -> bytes:
    """The seed in `path`; FileNotFoundError when there is none yet."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IdentityError(f"identity key {path} is not a regular file")
        if info.st_mode & 0o077:
            raise IdentityError(
                f"identity key {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); run `chmod 600 {path}`"
            )
        seed = os.read(fd, SEED_BYTES + 1)
    finally:
        os.close(fd)
    if len(seed) != SEED_BYTES:
        size = f"{len(seed)} bytes" if len(seed) <= SEED_BYTES else "more"
        raise IdentityError(
            f"identity key {path} is malformed: expected a {SEED_BYTES}-byte Ed25519 seed, found {size}"
        )
    return seed


def _create_seed(path: Path) -> bytes:
    """Writes a new random seed to `path`, atomically and never readable by others.

    The seed goes to a temporary file opened with mode 0600 from the start, is synced, and
    is then hard-linked into place: the link fails (FileExistsError) rather than replace a
    key another process created meanwhile.
    """
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise IdentityError(f"cannot create data dir {path.parent}: {error.strerror}") from error
    seed = libnacl.randombytes(SEED_BYTES)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{libnacl.randombytes(6).hex()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask can only remove bits; this also restores owner read
            os.write(fd, seed)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temporary, path)
    except FileExistsError:
        raise
    except OSError as error:
        raise IdentityError(f"cannot write identity key {path}: {error.strerror}") from error
    finally:
        temporary.unlink(missing_ok=True)
    _sync_directory(path.parent)
    return seed


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
