"""The dashboard's view of models: which exist, which are here, and who holds which layers.

Owns `catalog()`, a pure function over what the node says it serves (its `info`
answer), what the DHT says peers announce (its `peers` answer), what is on disk in the
data dir, the pins and the pull jobs; and the disk probes it is fed with
(`local_model`): where a registered model's file is, how big it is, and for a shard
set which shards are present. Nothing here downloads, assembles or opens a model:
packages are found with `importlib.util.find_spec`, which does not import them, and a
shard set is read through its manifest only. Must not import jax.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from swarm.models import REGISTRY, RegisteredModel

MANIFEST_FILE = "manifest.json"

# Layer counts of GGUF files by (path, size, mtime): read once per file version.
_layer_counts: dict[tuple[str, int, int], int | None] = {}


def _package_dir(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _registered_files(model: RegisteredModel, data_dir: Path) -> list[Path] | None:
    """The files a registered model occupies here, None when its packages are not installed.

    A model shipped in parts counts as its assembled file once assembled, else as its parts.
    """
    main = _package_dir(model.module)
    if main is None:
        return None
    if not model.parts:
        path = main / model.filename
        return [path] if path.is_file() else None
    assembled = data_dir / "models" / model.name / model.filename
    if assembled.is_file():
        return [assembled]
    files = []
    for module in model.parts:
        part_dir = _package_dir(module)
        if part_dir is None:
            return None
        files += sorted(path for path in part_dir.rglob(f"{model.filename}.part*") if path.is_file())
    return files or None


def shard_state(directory: Path) -> dict[str, Any] | None:
    """A shard set's shards from its manifest: index, layers [first, last), size, here or not.

    Presence is by file and size; hashes are the node's business when it opens the set.
    None when `directory` holds no readable manifest.
    """
    try:
        raw = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
        shards = raw["shards"]
        block_count = int(raw["model"]["block_count"])
        entries = []
        for shard in shards:
            path = directory / str(shard["file"])
            size = int(shard["size"])
            first, last = (int(x) for x in shard["layers"])
            here = path.is_file() and path.stat().st_size == size
            entries.append(
                {"index": int(shard["index"]), "layers": [first, last], "size_bytes": size, "here": here}
            )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"n_layers": block_count, "shards": entries}


def gguf_layers(path: Path, cache_dir: Path) -> int | None:
    """The block count in a GGUF file's metadata (through the node's parse cache), or None."""
    from swarm.errors import ModelFileError
    from swarm.gguf_file import GGUFFile

    try:
        stat = path.stat()
    except OSError:
        return None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _layer_counts:
        try:
            metadata = GGUFFile.open(path, cache_dir).metadata
            _layer_counts[key] = int(metadata[f"{metadata['general.architecture']}.block_count"])
        except (ModelFileError, OSError, ValueError, KeyError, TypeError):
            _layer_counts[key] = None
    return _layer_counts[key]


def local_model(model_id: str, data_dir: Path) -> dict[str, Any]:
    """What is on disk for `model_id`: `installed`, `size_bytes` and, for a shard set in
    `<data_dir>/models/<id>/`, its shards."""
    shard_dir = data_dir / "models" / model_id
    shards = shard_state(shard_dir) if shard_dir.is_dir() else None
    if shards is not None:
        held = sum(shard["size_bytes"] for shard in shards["shards"] if shard["here"])
        return {"installed": held > 0, "size_bytes": held, **shards}
    registered = REGISTRY.get(model_id)
    files = _registered_files(registered, data_dir) if registered else None
    if files is None:
        return {"installed": False, "size_bytes": None}
    found: dict[str, Any] = {"installed": True, "size_bytes": sum(path.stat().st_size for path in files)}
    if len(files) == 1:
        found["n_layers"] = gguf_layers(files[0], data_dir / "cache")
    return found


def _ranges_cover(ranges: Iterable[Iterable[int]], layer: int) -> bool:
    return any(first <= layer < last for first, last in ranges)


def catalog(
    node_info: Mapping[str, Any],
    peers: Iterable[Mapping[str, Any]],
    disk: Mapping[str, Mapping[str, Any]],
    pins: Iterable[str],
    pulls: Mapping[str, Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """One entry per model known here (registered, served, on disk) or announced by a peer.

    `node_info` is the node's `info` answer (or a `state: down` record), `peers` the DHT's
    contacts with their records, `disk` the `local_model` answer per model id, `pins` the
    pinned ids, `pulls` the pull jobs' status by model id. Each entry says which layers
    this node serves and which each peer announces, and per layer how many peers hold it.
    """
    served = {str(model["id"]): model for model in node_info.get("models", []) if "id" in model}
    announced: dict[str, list[dict[str, Any]]] = {}
    for peer in peers:
        for record in peer.get("records") or []:
            layers = record.get("layers")
            if not isinstance(layers, list) or len(layers) != 2:
                continue
            announced.setdefault(str(record.get("model_id")), []).append(
                {
                    "peer_id": peer.get("peer_id"),
                    "address": record.get("address"),
                    "layers": [int(layers[0]), int(layers[1])],
                    "latency_ms": peer.get("latency_ms"),
                    "n_layers": record.get("n_layers"),
                }
            )
    pinned = set(pins)
    names = [*REGISTRY, *served, *disk, *announced]
    entries = []
    for model_id in dict.fromkeys(names):
        registered = REGISTRY.get(model_id)
        model = served.get(model_id, {})
        local = disk.get(model_id, {"installed": False, "size_bytes": None})
        holders = announced.get(model_id, [])
        announced_layers = next((holder["n_layers"] for holder in holders if holder.get("n_layers")), None)
        n_layers = model.get("n_layers") or local.get("n_layers") or announced_layers
        layers_here = [model["layers"]] if isinstance(model.get("layers"), list) else []
        shards = local.get("shards")
        entry: dict[str, Any] = {
            "id": model_id,
            "description": registered.description if registered else "",
            "registered": registered is not None,
            "installed": bool(local.get("installed")) or model_id in served,
            "size_bytes": local.get("size_bytes"),
            "served": model_id in served,
            "state": model.get("state") or (node_info.get("state") if model_id in served else None),
            "error": model.get("error"),
            "architecture": model.get("architecture"),
            "context_length": model.get("context_length"),
            # Load on the served model: its shared decode batch and its prefix cache.
            "batch": model.get("batch"),
            "prefix_cache": model.get("prefix_cache"),
            "n_layers": n_layers,
            "layers_here": layers_here,
            "peers": holders,
            "pinned": model_id in pinned,
            "pull": pulls.get(model_id),
            "shards": shards,
            # Bytes of this model's shards that are missing here; None when unknown (a
            # whole file not installed yet has no manifest to count from).
            "download_bytes": (
                sum(shard["size_bytes"] for shard in shards if not shard["here"])
                if shards is not None
                else (0 if local.get("installed") or model_id in served else None)
            ),
        }
        if n_layers:
            entry["coverage"] = [
                {
                    "here": _ranges_cover(layers_here, layer),
                    "peers": sum(1 for holder in holders if _ranges_cover([holder["layers"]], layer)),
                }
                for layer in range(int(n_layers))
            ]
        entries.append(entry)
    return entries
