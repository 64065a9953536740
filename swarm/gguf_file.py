"""Reading GGUF files: metadata, the tensor table, and memory-mapped tensor bytes.

Owns the one place where GGUF bytes are parsed (through the `gguf` package) and the
cache of what is derived from that parse. gguf-py's reader decodes large metadata
arrays field by field (Gemma 3's 262k-entry vocabulary takes seconds), so the parsed
metadata and tensor table are cached as JSON keyed by the file's path, size and
modification time; later opens read the cache and memory-map the file directly.
The parse needs only the bytes before the tensor data, so it also reads a shard set's
`gguf_header.bin`; `swarm.shards` subclasses `GGUFFile` to map tensor bytes from shards.

Tensor bytes are never loaded whole: `tensor_bytes` returns a read-only view of a
memory map, so reading one layer range touches only that range's pages.

Imports numpy and gguf, never jax.
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from swarm.errors import ModelFileError
from swarm.files import atomic_write_text

GGUF_MAGIC = b"GGUF"
CACHE_FORMAT = 1

# Bytes per block and elements per block, as gguf.constants.GGML_QUANT_SIZES;
# looked up lazily so that opening a cached file does not import gguf.
_quant_sizes: dict[int, tuple[int, int]] | None = None


def _quant_size(qtype: int) -> tuple[int, int]:
    global _quant_sizes
    if _quant_sizes is None:
        from gguf.constants import GGML_QUANT_SIZES

        _quant_sizes = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
    if qtype not in _quant_sizes:
        raise ModelFileError(f"unknown GGML tensor type {qtype}")
    return _quant_sizes[qtype]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file.

    `ne` is GGUF order (innermost first): a weight matrix of ne = [in, out] is stored
    as `out` rows of `in` elements each.
    """

    name: str
    qtype: int
    ne: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def rows(self) -> int:
        rows = 1
        for n in self.ne[1:]:
            rows *= n
        return rows

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(self.rows, 1)

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy (row-major) shape of the logical tensor: reversed `ne`."""
        return tuple(reversed(self.ne))


class MappedFile:
    """A file's bytes mapped read-only, as u8[size]; pages it no longer needs can be handed
    back to the OS."""

    def __init__(self, path: Path):
        with open(path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self.data = np.frombuffer(self._map, dtype=np.uint8)

    def release(self, offset: int, size: int) -> None:
        """Drops the pages of bytes [offset, offset + size) from this process (those it
        shares with the bytes around included): they stop counting in its memory, and are
        read from the file again if anything touches them. Nothing where the OS cannot."""
        advise = getattr(self._map, "madvise", None)
        if advise is None or not hasattr(mmap, "MADV_DONTNEED") or size <= 0:
            return
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(len(self._map), offset + size)
        advise(mmap.MADV_DONTNEED, start, end - start)

    def release_all(self) -> None:
        """Drops every page of the file from this process (see `release`)."""
        self.release(0, len(self._map))


class GGUFFile:
    """A GGUF file opened for reading: metadata dict, tensor table, memmapped bytes."""

    def __init__(
        self, path: Path, metadata: dict[str, Any], tensors: dict[str, TensorInfo], cache_key: str = ""
    ):
        self.path = path
        self.cache_key = cache_key  # identifies this file's content for derived caches
        self.metadata = metadata
        self.tensors = tensors
        self._mapped: MappedFile | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], cache_dir: Path | None = None) -> GGUFFile:
        """Open `path`, using (and filling) the parse cache in `cache_dir` if given."""
        path = Path(path)
        if not path.exists():
            raise ModelFileError(f"model file not found: {path}")
        if not path.is_file():
            raise ModelFileError(f"not a file: {path}")
        stat = path.stat()
        with path.open("rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                raise ModelFileError(f"{path}: not a GGUF file (bad magic bytes)")
        cache_key = _cache_key(path, stat)
        metadata, tensors = read_header(path, cache_dir, cache_key)
        gguf_file = cls(path, metadata, tensors, cache_key)
        gguf_file._check_extent(stat.st_size)
        return gguf_file

    def _check_extent(self, file_size: int) -> None:
        for info in self.tensors.values():
            if info.offset + info.nbytes > file_size:
                raise ModelFileError(
                    f"{self.path}: truncated: tensor {info.name} ends at byte "
                    f"{info.offset + info.nbytes} but the file has {file_size} bytes"
                )

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFileError(f"{self.path}: missing metadata key general.architecture")
        return arch

    def tensor_bytes(self, name: str) -> np.ndarray:
        """Raw bytes of tensor `name` as u8[rows, row_bytes], a read-only memmap view."""
        info = self.tensor_info(name)
        return self._flat_bytes(info).reshape(info.rows, info.row_bytes)

    def _flat_bytes(self, info: TensorInfo) -> np.ndarray:
        """u8[nbytes] of one tensor. A shard set (swarm.shards) maps these from its shards."""
        if self._mapped is None:
            self._mapped = MappedFile(self.path)
        return self._mapped.data[info.offset : info.offset + info.nbytes]

    def release(self, name: str) -> None:
        """Drops tensor `name`'s mapped bytes from this process's memory, once what reads
        them holds its own copy (an engine's weights): a loaded model then does not hold
        its GGUF twice. They are read from the file again if touched."""
        if self._mapped is not None:
            info = self.tensor_info(name)
            self._mapped.release(info.offset, info.nbytes)

    def release_all(self) -> None:
        """Drops every mapped page of the file from this process's memory. Reading a
        tensor maps the pages around it too (the OS reads ahead), some of them of
        tensors already released: a loader calls this once it is done."""
        if self._mapped is not None:
            self._mapped.release_all()

    def tensor_info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise ModelFileError(f"{self.path}: missing tensor {name}")
        return info


@dataclass(frozen=True)
class ParsedHeader:
    """What a GGUF header says: metadata, the tensor table, and where tensor data starts."""

    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_offset: int  # start of the tensor data section: the header's length, padding included


def read_header(
    path: Path, cache_dir: Path | None, cache_key: str
) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """Metadata and tensor table of the GGUF header at `path`, through the parse cache."""
    cache_path = cache_dir / "gguf" / f"{cache_key}.json" if cache_dir else None
    parsed = _read_cache(cache_path) if cache_path else None
    if parsed is None:
        header = parse_header(path)
        parsed = header.metadata, header.tensors
        if cache_path:
            _write_cache(cache_path, parsed)
    return parsed


@functools.cache
def _table_reader() -> type:
    from gguf import GGUFReader

    class TableReader(GGUFReader):
        """GGUFReader that records the tensor table without mapping tensor data.

        gguf-py's `_build_tensors` makes a numpy view of every tensor's data, which fails
        on a header cut at the data section (a shard set's gguf_header.bin); the table
        itself (name, type, dims, offset) is all that is needed here.
        """

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            self.table = []
            for field in fields:
                _name_length, name, _n_dims, dims, qtype, offset = field.parts
                entry = (bytes(name).decode("utf-8"), int(qtype[0]), tuple(int(n) for n in dims))
                self.table.append((*entry, int(start_offs + offset[0])))

    return TableReader


def parse_header(path: Path) -> ParsedHeader:
    """Parse the GGUF header of `path`: a whole file or only its bytes before the tensor data."""
    try:
        reader = _table_reader()(path, "r")
    except Exception as error:  # gguf-py raises ValueError, IndexError, struct errors...
        raise ModelFileError(f"{path}: cannot parse GGUF ({type(error).__name__}: {error})") from None
    metadata: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            metadata[name] = field.contents()
        except (UnicodeDecodeError, ValueError) as error:
            raise ModelFileError(f"{path}: malformed metadata field {name}: {error}") from None
    tensors: dict[str, TensorInfo] = {}
    for name, qtype, ne, offset in reader.table:
        if name in tensors:
            raise ModelFileError(f"{path}: tensor {name} appears twice")
        block_size, type_size = _quant_size(qtype)
        n_elements = int(np.prod(ne)) if ne else 1
        if ne and ne[0] % block_size:
            raise ModelFileError(f"{path}: tensor {name} row length {ne[0]} is not a multiple of its block")
        nbytes = n_elements // block_size * type_size
        tensors[name] = TensorInfo(name, qtype, ne, offset, nbytes)
    return ParsedHeader(metadata, tensors, int(reader.data_offset))


def _cache_key(path: Path, stat: os.stat_result) -> str:
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_FORMAT}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _read_cache(cache_path: Path) -> tuple[dict[str, Any], dict[str, TensorInfo]] | None:
    try:
        raw = json.loads(cache_path.read_text(encoding="utf-8"))
        tensors = {t[0]: TensorInfo(t[0], t[1], tuple(t[2]), t[3], t[4]) for t in raw["tensors"]}
        return raw["metadata"], tensors
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None  # absent or damaged: parse the file again


def _write_cache(cache_path: Path, parsed: tuple[dict[str, Any], dict[str, TensorInfo]]) -> None:
    metadata, tensors = parsed
    payload = {
        "metadata": metadata,
        "tensors": [[t.name, t.qtype, list(t.ne), t.offset, t.nbytes] for t in tensors.values()],
    }
    atomic_write_text(cache_path, json.dumps(payload, ensure_ascii=False))
