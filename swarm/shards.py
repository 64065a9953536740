"""Shard sets: a GGUF split into layer-aligned shard files, and a GGUF view over them.

Owns the shard-only model store of DESIGN.md §3. `split_gguf` writes `manifest.json`,
`gguf_header.bin` (the source's bytes before its tensor data, so tensor offsets stay
valid) and `shard_NNN.bin` files. `ShardSet` opens such a directory, hashes the shards it
finds, quarantines any that do not match (renamed `.quarantine`, never served), and
`as_gguf` presents header + present shards as a `GGUFFile`: the engine loads a layer
range from a shard set through the same code as from the whole file.

Layout: no layer spans two shards. Shard 0 holds `token_embd.weight` (and any other
non-layer tensor) with the first layers; the last shard holds `output_norm.weight` and
`output.weight`, or, when the output is tied to the embedding, a copy of
`token_embd.weight`, so that the holder of the last layers can compute logits alone.
Each shard packs its tensors back to back, each start aligned to 32 bytes.

Imports numpy and gguf (through swarm.gguf_file), never jax.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from swarm.errors import InvalidRequestError, ModelFileError
from swarm.files import atomic_write_text, atomic_writer
from swarm.gguf_file import (
    CACHE_FORMAT,
    GGUFFile,
    MappedFile,
    TensorInfo,
    parse_header,
    read_header,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
HEADER_FILE = "gguf_header.bin"
ALIGNMENT = 32  # GGUF's default data alignment
EMBEDDING = "token_embd.weight"
MIB = 1 << 20
_CHUNK = 8 * MIB  # bytes read from the source memory map at a time
_LAYER = re.compile(r"blk\.(\d+)\.")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def shard_file_name(index: int) -> str:
    return f"shard_{index:03d}.bin"


def layer_of(name: str) -> int | None:
    """The layer a tensor belongs to (`blk.N.*`), or None for a non-layer tensor."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class TensorLocation:
    shard: int
    offset: int  # within the shard file
    size: int
    data_offset: int  # in the source's tensor data section (absolute offset - header size)


@dataclass(frozen=True)
class TensorCopy:
    """A second copy of a tensor in another shard (the tied embedding in the last shard)."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class ShardEntry:
    index: int
    file: str
    size: int
    sha256: str
    layers: tuple[int, int]  # [first, last)
    tensors: tuple[str, ...]  # tensors whose primary location is this shard
    copies: tuple[TensorCopy, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """What `manifest.json` says; `from_dict` validates, `to_json` adds the hash."""

    name: str  # general.name
    architecture: str
    block_count: int
    source_file: str
    source_size: int
    source_sha256: str
    header_size: int
    header_sha256: str
    shard_size_bytes: int  # the budget the split used
    shards: tuple[ShardEntry, ...]
    tensors: Mapping[str, TensorLocation]

    @property
    def tied_output(self) -> bool:
        return "output.weight" not in self.tensors

    def holders(self, name: str) -> list[tuple[int, int, int]]:
        """(shard, offset, size) of every copy of tensor `name`, the primary first."""
        primary = self.tensors[name]
        found = [(primary.shard, primary.offset, primary.size)]
        for shard in self.shards:
            found += [(shard.index, c.offset, c.size) for c in shard.copies if c.name == name]
        return found

    def body(self) -> dict[str, Any]:
        """The JSON object without its hash."""
        return {
            "format_version": FORMAT_VERSION,
            "model": {
                "name": self.name,
                "architecture": self.architecture,
                "block_count": self.block_count,
                "source_file": self.source_file,
                "source_size": self.source_size,
                "source_sha256": self.source_sha256,
            },
            "header": {"file": HEADER_FILE, "size": self.header_size, "sha256": self.header_sha256},
            "alignment": ALIGNMENT,
            "shard_size_bytes": self.shard_size_bytes,
            "shards": [
                {
                    "index": s.index,
                    "file": s.file,
                    "size": s.size,
                    "sha256": s.sha256,
                    "layers": list(s.layers),
                    "tensors": list(s.tensors),
                    "copies": [{"name": c.name, "offset": c.offset, "size": c.size} for c in s.copies],
                }
                for s in self.shards
            ],
            "tensors": {
                name: {"shard": t.shard, "offset": t.offset, "size": t.size, "data_offset": t.data_offset}
                for name, t in self.tensors.items()
            },
        }

    @property
    def sha256(self) -> str:
        return _canonical_hash(self.body())

    def to_json(self) -> str:
        return json.dumps({**self.body(), "manifest_sha256": self.sha256}, indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: Any, where: str = MANIFEST_FILE) -> Manifest:
        """Validate a parsed manifest; any problem is a ModelFileError naming it."""
        if not isinstance(raw, dict):
            raise ModelFileError(f"{where}: not a JSON object")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelFileError(f"{where}: format version {version!r} is not supported ({FORMAT_VERSION})")
        claimed = _get(raw, "manifest_sha256", str, where)
        if _canonical_hash({k: v for k, v in raw.items() if k != "manifest_sha256"}) != claimed:
            raise ModelFileError(f"{where}: manifest hash does not match its contents (edited or damaged)")
        model = _get(raw, "model", dict, where)
        header = _get(raw, "header", dict, where)
        if _get(raw, "alignment", int, where) != ALIGNMENT:
            raise ModelFileError(f"{where}: alignment must be {ALIGNMENT}")
        shards = []
        for position, entry in enumerate(_get(raw, "shards", list, where)):
            at = f"{where}: shards[{position}]"
            layers = _get(entry, "layers", list, at)
            if len(layers) != 2 or not all(type(n) is int for n in layers):
                raise ModelFileError(f"{at}: layers must be [first, last]")
            copies = tuple(
                TensorCopy(_get(c, "name", str, at), _get(c, "offset", int, at), _get(c, "size", int, at))
                for c in _get(entry, "copies", list, at)
            )
            names = _get(entry, "tensors", list, at)
            if not all(isinstance(name, str) for name in names):
                raise ModelFileError(f"{at}: tensors must be names")
            shards.append(
                ShardEntry(
                    index=_get(entry, "index", int, at),
                    file=_get(entry, "file", str, at),
                    size=_get(entry, "size", int, at),
                    sha256=_get(entry, "sha256", str, at),
                    layers=(layers[0], layers[1]),
                    tensors=tuple(names),
                    copies=copies,
                )
            )
        tensors = {}
        for name, entry in _get(raw, "tensors", dict, where).items():
            at = f"{where}: tensors[{name}]"
            tensors[name] = TensorLocation(*(_get(entry, k, int, at) for k in _LOCATION_KEYS))
        if _get(header, "file", str, f"{where}: header") != HEADER_FILE:
            raise ModelFileError(f"{where}: header file must be {HEADER_FILE}")
        manifest = cls(
            name=_get(model, "name", str, f"{where}: model"),
            architecture=_get(model, "architecture", str, f"{where}: model"),
            block_count=_get(model, "block_count", int, f"{where}: model"),
            source_file=_get(model, "source_file", str, f"{where}: model"),
            source_size=_get(model, "source_size", int, f"{where}: model"),
            source_sha256=_get(model, "source_sha256", str, f"{where}: model"),
            header_size=_get(header, "size", int, f"{where}: header"),
            header_sha256=_get(header, "sha256", str, f"{where}: header"),
            shard_size_bytes=_get(raw, "shard_size_bytes", int, where),
            shards=tuple(shards),
            tensors=tensors,
        )
        _check_layout(manifest, where)
        return manifest


_LOCATION_KEYS = ("shard", "offset", "size", "data_offset")


def _get(obj: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(obj, dict):
        raise ModelFileError(f"{where}: expected a JSON object")
    if key not in obj:
        raise ModelFileError(f"{where}: missing key {key}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ModelFileError(f"{where}: {key} must be of type {kind.__name__}")
    return value


def _canonical_hash(body: dict[str, Any]) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _check_layout(manifest: Manifest, where: str) -> None:
    """Layers tile [0, block_count) in shard order; every extent lies inside its shard, unshared."""
    if not manifest.shards:
        raise ModelFileError(f"{where}: no shards")
    for digest in (manifest.source_sha256, manifest.header_sha256, *(s.sha256 for s in manifest.shards)):
        if not _SHA256.fullmatch(digest):
            raise ModelFileError(f"{where}: {digest!r} is not a sha256 hex digest")
    next_layer = 0
    for position, shard in enumerate(manifest.shards):
        at = f"{where}: shard {position}"
        if shard.index != position or shard.file != shard_file_name(position):
            raise ModelFileError(f"{at}: index or file name out of order")
        first, last = shard.layers
        if first != next_layer or last <= first:
            raise ModelFileError(f"{at}: layers {first}-{last} do not follow layer {next_layer}")
        next_layer = last
        extents = []
        for name in shard.tensors:
            location = manifest.tensors.get(name)
            if location is None or location.shard != position:
                raise ModelFileError(f"{at}: tensor {name} is not mapped to this shard")
            layer = layer_of(name)
            if layer is not None and not first <= layer < last:
                raise ModelFileError(f"{at}: tensor {name} lies outside layers {first}-{last}")
            extents.append((location.offset, location.size, name))
        for copy in shard.copies:
            primary = manifest.tensors.get(copy.name)
            if primary is None or primary.size != copy.size:
                raise ModelFileError(f"{at}: copy of {copy.name} does not match a tensor")
            extents.append((copy.offset, copy.size, copy.name))
        end = 0
        for offset, size, name in sorted(extents):
            if offset < end or size <= 0 or offset + size > shard.size:
                raise ModelFileError(f"{at}: tensor {name} at {offset}+{size} overlaps or overruns")
            end = offset + size
    if next_layer != manifest.block_count:
        raise ModelFileError(f"{where}: shards cover layers 0-{next_layer}, not 0-{manifest.block_count}")
    listed = sum(len(s.tensors) for s in manifest.shards)
    if listed != len(manifest.tensors):
        raise ModelFileError(f"{where}: {len(manifest.tensors) - listed} tensors belong to no shard")


def read_manifest(path: Path) -> Manifest:
    if not path.is_file():
        raise ModelFileError(f"{path.parent}: no {path.name} (not a shard directory)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ModelFileError(f"{path}: not valid JSON ({error})") from None
    return Manifest.from_dict(raw, str(path))


def select_shards(manifest: Manifest, layers: tuple[int, int]) -> list[int]:
    """Shard indices a node needs to run layers [first, last), embedding and head included."""
    first, last = layers
    if not 0 <= first < last <= manifest.block_count:
        raise ModelFileError(f"layer range {first}-{last} is outside 0-{manifest.block_count}")
    chosen = {s.index for s in manifest.shards if s.layers[0] < last and first < s.layers[1]}
    needed = [EMBEDDING] if first == 0 else []
    if last == manifest.block_count:
        needed += ["output_norm.weight", EMBEDDING if manifest.tied_output else "output.weight"]
    for name in needed:
        if name in manifest.tensors:
            holders = [shard for shard, _, _ in manifest.holders(name)]
            if chosen.isdisjoint(holders):
                chosen.add(holders[0])
    return sorted(chosen)


# ---------------------------------------------------------------------------- splitting


@dataclass(frozen=True)
class _PlannedShard:
    layers: tuple[int, int]
    tensors: tuple[str, ...]  # sorted by source offset
    copies: tuple[str, ...]


def _aligned(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


def _plan(tensors: Mapping[str, TensorInfo], block_count: int, budget: int) -> list[_PlannedShard]:
    """Greedy layer packing: a shard takes whole layers while it stays within the budget.

    Shard 0's non-layer tensors count toward its budget, and the head (with the tied
    embedding's copy) toward the last layer's, so only a shard of one layer overruns.
    """
    by_layer: list[list[str]] = [[] for _ in range(block_count)]
    prefix, suffix = [], []
    for name in tensors:
        layer = layer_of(name)
        if layer is None:
            (suffix if name.startswith("output") else prefix).append(name)
        elif layer < block_count:
            by_layer[layer].append(name)
        else:
            raise ModelFileError(f"tensor {name} names a layer beyond block_count {block_count}")

    def size(names: list[str]) -> int:
        return sum(_aligned(tensors[name].nbytes) for name in names)

    tied_copy = [EMBEDDING] if "output.weight" not in tensors and EMBEDDING in tensors else []
    layer_sizes = [size(names) for names in by_layer]
    groups: list[list[int]]
    if size(prefix) + sum(layer_sizes) + size(suffix) <= budget:
        groups = [list(range(block_count))]  # one shard: no copy needed
    else:
        layer_sizes[-1] += size(suffix) + size(tied_copy)
        groups, filled = [[]], size(prefix)
        for layer, layer_size in enumerate(layer_sizes):
            if groups[-1] and filled + layer_size > budget:
                groups.append([])
                filled = 0
            groups[-1].append(layer)
            filled += layer_size
    plans = []
    for position, group in enumerate(groups):
        names = [name for layer in group for name in by_layer[layer]]
        if position == 0:
            names += prefix
        copies: tuple[str, ...] = ()
        if position == len(groups) - 1:
            names += suffix
            if position > 0:
                copies = tuple(tied_copy)
        names.sort(key=lambda name: tensors[name].offset)
        plans.append(_PlannedShard((group[0], group[-1] + 1), tuple(names), copies))
    return plans


def _write_pieces(path: Path, source: np.ndarray, pieces: list[tuple[int, int, int]]) -> tuple[int, str]:
    """Write (file_offset, source_offset, size) pieces, zero-padding gaps; returns (size, sha256).

    source: u8[file_size] memory map, read `_CHUNK` bytes at a time.
    """
    digest = hashlib.sha256()
    position = 0
    with atomic_writer(path) as handle:
        for file_offset, source_offset, size in pieces:
            padding = bytes(file_offset - position)
            handle.write(padding)
            digest.update(padding)
            for start in range(source_offset, source_offset + size, _CHUNK):
                chunk = source[start : min(start + _CHUNK, source_offset + size)]
                handle.write(chunk)
                digest.update(chunk)
            position = file_offset + size
    return position, digest.hexdigest()


def _file_sha256(source: np.ndarray) -> str:
    digest = hashlib.sha256()
    for start in range(0, len(source), _CHUNK):
        digest.update(source[start : start + _CHUNK])
    return digest.hexdigest()


def split_gguf(source: Path, out_dir: Path, *, shard_size_mb: float = 256) -> Manifest:
    """Split the GGUF `source` into a shard set in `out_dir`; shard size budget in MiB.

    Shards are written first and the manifest last, each file atomically, so a
    directory with a manifest always holds a complete split.
    """
    source, out_dir = Path(source), Path(out_dir)
    if not shard_size_mb > 0:
        raise InvalidRequestError(f"shard size must be positive, not {shard_size_mb} MiB")
    if not source.is_file():
        raise ModelFileError(f"model file not found: {source}")
    parsed = parse_header(source)
    source_size = source.stat().st_size
    for info in parsed.tensors.values():
        if info.offset + info.nbytes > source_size:
            raise ModelFileError(f"{source}: truncated: tensor {info.name} ends past the end of the file")
    architecture = parsed.metadata.get("general.architecture")
    block_count = parsed.metadata.get(f"{architecture}.block_count")
    if not isinstance(architecture, str) or not isinstance(block_count, int) or block_count < 1:
        raise ModelFileError(f"{source}: missing metadata key general.architecture or block_count")
    budget = int(shard_size_mb * MIB)
    plans = _plan(parsed.tensors, block_count, budget)

    source_map = np.memmap(source, dtype=np.uint8, mode="r")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        header_size, header_sha256 = _write_pieces(
            out_dir / HEADER_FILE, source_map, [(0, 0, parsed.data_offset)]
        )
        shards, locations = [], {}
        for index, plan in enumerate(plans):
            pieces, copies, end = [], [], 0
            for position, name in enumerate((*plan.tensors, *plan.copies)):
                info = parsed.tensors[name]
                offset, end = _aligned(end), _aligned(end) + info.nbytes
                pieces.append((offset, info.offset, info.nbytes))
                if position < len(plan.tensors):
                    data_offset = info.offset - parsed.data_offset
                    locations[name] = TensorLocation(index, offset, info.nbytes, data_offset)
                else:
                    copies.append(TensorCopy(name, offset, info.nbytes))
            size, sha256 = _write_pieces(out_dir / shard_file_name(index), source_map, pieces)
            shards.append(
                ShardEntry(
                    index, shard_file_name(index), size, sha256, plan.layers, plan.tensors, tuple(copies)
                )
            )
        manifest = Manifest(
            name=str(parsed.metadata.get("general.name", source.stem)),
            architecture=architecture,
            block_count=block_count,
            source_file=source.name,
            source_size=source_size,
            source_sha256=_file_sha256(source_map),
            header_size=header_size,
            header_sha256=header_sha256,
            shard_size_bytes=budget,
            shards=tuple(shards),
            tensors={name: locations[name] for name in parsed.tensors},
        )
        atomic_write_text(out_dir / MANIFEST_FILE, manifest.to_json())
    except OSError as error:
        raise ModelFileError(f"{out_dir}: cannot write the shard set ({error})") from None
    finally:
        del source_map
    return manifest


# ---------------------------------------------------------------------------- reading


def _file_problem(path: Path, size: int, sha256: str | None) -> str | None:
    """Why `path` does not match its manifest entry, or None. Hashes in bounded chunks."""
    actual = path.stat().st_size
    if actual != size:
        return f"size {actual} bytes, manifest says {size}"
    if sha256 is None:
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return None if digest.hexdigest() == sha256 else "sha256 does not match the manifest"


class ShardSet:
    """A shard directory: its manifest and the shards present here that passed their check."""

    def __init__(
        self, directory: Path, manifest: Manifest, present: frozenset[int], quarantined: frozenset[int]
    ):
        self.directory = directory
        self.manifest = manifest
        self._present = present
        self._quarantined = quarantined
        self._maps: dict[int, MappedFile] = {}

    @classmethod
    def open(cls, directory: Path, *, verify: bool = True) -> ShardSet:
        """Read and check the manifest and header; verify each present shard's sha256.

        A missing shard is normal (a node holds a subset). A shard that fails its check
        is renamed `shard_NNN.bin.quarantine` and treated as missing. verify=False checks
        shard sizes only.
        """
        directory = Path(directory)
        manifest = read_manifest(directory / MANIFEST_FILE)
        header = directory / HEADER_FILE
        if not header.is_file():
            raise ModelFileError(f"{directory}: {HEADER_FILE} is missing")
        problem = _file_problem(header, manifest.header_size, manifest.header_sha256)
        if problem:
            raise ModelFileError(f"{header}: {problem}")
        present, quarantined = set(), set()
        for shard in manifest.shards:
            path = directory / shard.file
            if not path.is_file():
                continue
            problem = _file_problem(path, shard.size, shard.sha256 if verify else None)
            if problem is None:
                present.add(shard.index)
                continue
            quarantined.add(shard.index)
            target = path.with_name(path.name + ".quarantine")
            try:
                os.replace(path, target)
            except OSError as error:
                logger.warning("shard %s: %s; not served (cannot quarantine it: %s)", path, problem, error)
            else:
                logger.warning("shard %s: %s; quarantined as %s, not served", path, problem, target.name)
        return cls(directory, manifest, frozenset(present), frozenset(quarantined))

    @property
    def present_shards(self) -> list[int]:
        return sorted(self._present)

    def layers_held(self) -> list[tuple[int, int]]:
        """The contiguous layer ranges [first, last) whose shards are all present, merged."""
        ranges: list[tuple[int, int]] = []
        for index in self.present_shards:
            first, last = self.manifest.shards[index].layers
            if ranges and ranges[-1][1] == first:
                ranges[-1] = (ranges[-1][0], last)
            else:
                ranges.append((first, last))
        return ranges

    def holds(self, name: str) -> bool:
        """Whether tensor `name` can be read here (from its primary shard or a copy)."""
        return name in self.manifest.tensors and any(
            shard in self._present for shard, _, _ in self.manifest.holders(name)
        )

    @property
    def has_embedding(self) -> bool:
        """token_embd.weight is readable (in shard 0, or as the tied copy in the last shard)."""
        return self.holds(EMBEDDING)

    @property
    def has_head(self) -> bool:
        """output_norm and the output matrix (the embedding when tied) are readable."""
        output = EMBEDDING if self.manifest.tied_output else "output.weight"
        return self.holds("output_norm.weight") and self.holds(output)

    def tensor_data(self, name: str) -> np.ndarray:
        """u8[size] read-only memmap view of tensor `name` in a present shard."""
        if name not in self.manifest.tensors:
            raise ModelFileError(f"{self.directory}: missing tensor {name}")
        holders = self.manifest.holders(name)
        for shard, offset, size in holders:
            if shard in self._present:
                if shard not in self._maps:
                    self._maps[shard] = MappedFile(self.directory / self.manifest.shards[shard].file)
                return self._maps[shard].data[offset : offset + size]
        shard = holders[0][0]
        layer = layer_of(name)
        what = f"layer {layer}" if layer is not None else name
        why = "quarantined: its hash did not match" if shard in self._quarantined else "missing"
        raise ModelFileError(f"{self.directory}: {what} is not held here (shard {shard} {why})")

    def release(self, name: str) -> None:
        """Drops the mapped bytes tensor `name` was read from (see GGUFFile.release)."""
        for shard, offset, size in self.manifest.holders(name) if name in self.manifest.tensors else ():
            if shard in self._maps:
                self._maps[shard].release(offset, size)

    def release_all(self) -> None:
        """Drops every mapped page of the shards from this process (see GGUFFile.release_all)."""
        for mapped in self._maps.values():
            mapped.release_all()

    def as_gguf(self, cache_dir: Path | None = None) -> ShardedGGUF:
        """The source GGUF as the engine sees it; tensors of absent shards raise on read."""
        header = self.directory / HEADER_FILE
        key = f"shards|{self.manifest.header_sha256}|{CACHE_FORMAT}"
        cache_key = hashlib.sha256(key.encode()).hexdigest()[:32]
        metadata, tensors = read_header(header, cache_dir, cache_key)
        self._check_table(metadata, tensors)
        return ShardedGGUF(self, metadata, tensors, cache_key)

    def _check_table(self, metadata: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> None:
        where = f"{self.directory}: {HEADER_FILE} and {MANIFEST_FILE} disagree"
        manifest = self.manifest
        if metadata.get(f"{manifest.architecture}.block_count") != manifest.block_count:
            raise ModelFileError(f"{where} on the architecture or block count")
        if set(tensors) != set(manifest.tensors):
            differ = sorted(set(tensors) ^ set(manifest.tensors))
            raise ModelFileError(f"{where} on the tensor list ({', '.join(differ[:3])})")
        for name, info in tensors.items():
            location = manifest.tensors[name]
            if (location.size, location.data_offset) != (info.nbytes, info.offset - manifest.header_size):
                raise ModelFileError(f"{where} on tensor {name}")


class ShardedGGUF(GGUFFile):
    """A shard set seen as its source GGUF: the header's metadata and table, shard bytes."""

    def __init__(
        self, shard_set: ShardSet, metadata: dict[str, Any], tensors: dict[str, TensorInfo], cache_key: str
    ):
        super().__init__(shard_set.directory, metadata, tensors, cache_key)
        self.shard_set = shard_set

    def _flat_bytes(self, info: TensorInfo) -> np.ndarray:
        return self.shard_set.tensor_data(info.name)

    def release(self, name: str) -> None:
        self.shard_set.release(name)

    def release_all(self) -> None:
        self.shard_set.release_all()


# ---------------------------------------------------------------------------- CLI


def link_shards(shard_dir: Path, indices: list[int], out: Path) -> Path:
    """`out` as a shard directory: the manifest, the header and shards `indices` of the set
    in `shard_dir`, hard-linked (copied where a link cannot be made); files there are kept."""
    out.mkdir(parents=True, exist_ok=True)
    for name in [MANIFEST_FILE, HEADER_FILE, *(shard_file_name(i) for i in sorted(indices))]:
        if not (out / name).exists():
            try:
                os.link(shard_dir / name, out / name)
            except OSError:
                shutil.copyfile(shard_dir / name, out / name)
    return out


def shard_command(source: Path, out_dir: Path, shard_size_mb: float) -> Manifest:
    """`swarm shard`: split, then reopen the result as a reader would."""
    manifest = split_gguf(source, out_dir, shard_size_mb=shard_size_mb)
    shard_set = ShardSet.open(out_dir, verify=False)
    shard_set.as_gguf()
    if shard_set.layers_held() != [(0, manifest.block_count)]:
        raise ModelFileError(f"{out_dir}: the split does not read back whole")
    return manifest


def describe(manifest: Manifest) -> str:
    """A one-screen summary of a shard set."""

    def mib(size: int) -> str:
        return f"{size / MIB:8.1f} MiB" if size >= MIB else f"{size / 1024:8.1f} KiB"

    tied = ", output tied to the embedding" if manifest.tied_output else ""
    lines = [
        f"{manifest.name}: {manifest.architecture}, {manifest.block_count} layers{tied}",
        f"source   {mib(manifest.source_size)}  {manifest.source_file}  sha256 {manifest.source_sha256[:16]}",
        f"header   {mib(manifest.header_size)}  {HEADER_FILE}",
    ]
    last = len(manifest.shards) - 1
    for shard in manifest.shards:
        first, end = shard.layers
        extras = []
        if shard.index == 0:
            extras.append("embedding")
        if shard.index == last:
            extras.append("head")
            extras += [f"copy of {copy.name}" for copy in shard.copies]
        notes = f"  + {', '.join(extras)}" if extras else ""
        span = f"layers {first}-{end - 1} ({end - first})"
        lines.append(f"shard {shard.index:<3}{mib(shard.size)}  {shard.file}  {span}{notes}")
    budget = mib(manifest.shard_size_bytes).strip()
    lines.append(f"{len(manifest.shards)} shards of at most {budget} each; manifest sha256 {manifest.sha256}")
    return "\n".join(lines)
