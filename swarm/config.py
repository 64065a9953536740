"""The node's settings: one typed, frozen `Config`, where it comes from and where it is saved.

Layers, lowest first: the defaults below < `<data_dir>/config.yaml` < `SWARM_<SECTION>_<KEY>`
environment variables < explicit overrides (CLI flags). A key no layer knows is an error
that names it. `config.yaml` keeps only the values that differ from the defaults, so
improved defaults reach existing installs. Also owns the node's API key file.

Imports only the standard library, yaml and swarm's light modules: never jax, so the
control plane and the DHT process can read the config.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from swarm.errors import InvalidRequestError
from swarm.files import atomic_write_text

CONFIG_FILE = "config.yaml"
API_KEY_FILE = "api_key"
# Variables other parts of the program (tests, process plumbing) own.
_IGNORED_ENVIRONMENT_PREFIXES = ("SWARM_TEST_", "SWARM_INTERNAL_")


class ConfigError(InvalidRequestError):
    """A config file, environment variable, override or update with an unknown key or bad value."""


def _metadata(doc: str, *, restart: bool = False, **limits: Any) -> dict[str, Any]:
    return {"doc": doc, "restart": restart, **limits}


def _key(default: Any, doc: str, *, restart: bool = False, **limits: Any) -> Any:
    """A config key: default, one-line description, whether changing it needs a restart, and
    its limits (`low`/`high` inclusive, `above` exclusive, `choices`) that `__post_init__` checks."""
    return field(default=default, metadata=_metadata(doc, restart=restart, **limits))


class _Section:
    """Base of the section dataclasses: checks every key against the limits in its metadata."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            key, value, limits = f"{self.section}.{item.name}", getattr(self, item.name), item.metadata
            if "choices" in limits and value not in limits["choices"]:
                choices = ", ".join(limits["choices"])
                raise ConfigError(f"config key {key} must be one of {choices}, got {value!r}")
            if "high" in limits and not limits["low"] <= value <= limits["high"]:
                raise ConfigError(
                    f"config key {key} must be between {limits['low']} and {limits['high']}, got {value!r}"
                )
            if "low" in limits and not value >= limits["low"]:
                raise ConfigError(f"config key {key} must be at least {limits['low']}, got {value!r}")
            if "above" in limits and not value > limits["above"]:
                raise ConfigError(f"config key {key} must be greater than {limits['above']}, got {value!r}")


@dataclass(frozen=True)
class NodeConfig(_Section):
    section = "node"
    data_dir: str = _key("", "data dir; empty = platform default (informational)", restart=True)
    host: str = _key("127.0.0.1", "address the HTTP server binds", restart=True)
    listen_port: int = _key(8800, "HTTP port", restart=True, low=0, high=65535)
    model: str = _key("smollm2-135m", "model the node serves", restart=True)
    layers: str = _key("", "layers this node holds, as FIRST-LAST (end exclusive); empty = all", restart=True)
    contribution: str = _key(
        "minimal", "share of this machine lent to the swarm", choices=("minimal", "moderate", "maximum")
    )


@dataclass(frozen=True)
class ApiConfig(_Section):
    section = "api"
    key: str = _key("", "API key; empty = generated on first run into <data_dir>/api_key")
    workers: int = _key(1, "gunicorn gevent workers", restart=True, low=1, high=64)
    rate_limit_rpm: int = _key(600, "requests per minute per IP on /v1 and /mcp; 0 disables", low=0)
    rate_limit_admin_rpm: int = _key(200, "requests per minute per IP on /api/admin; 0 disables", low=0)
    max_body_mb: float = _key(32.0, "largest request body accepted, in MB", above=0)
    metrics_auth_required: bool = _key(False, "whether /metrics needs the API key")
    cors_origins: list[str] = field(
        default_factory=list, metadata=_metadata("origins allowed besides the dashboard's own")
    )
    request_timeout_s: float = _key(600.0, "longest a request may run, in seconds", above=0)


@dataclass(frozen=True)
class InferenceConfig(_Section):
    section = "inference"
    max_concurrent_requests: int = _key(8, "requests decoded at once", low=1)
    max_queue: int = _key(256, "requests waiting beyond those; more get 503", low=0)
    max_context: int = _key(8192, "context window in tokens; 0 = the model's own", restart=True, low=0)
    default_max_tokens: int = _key(1024, "max_tokens when a request gives none", low=1)
    weights: str = _key("auto", "weight layout", restart=True, choices=("auto", "f32", "packed"))
    layers: str = _key("auto", "layer loop", restart=True, choices=("auto", "scan", "unroll"))
    kv_cache: str = _key("f16", "KV cache dtype", restart=True, choices=("f16", "f32"))
    prefill_chunk: int = _key(
        256, "prompt tokens prefilled between other requests' steps; 0 = all at once", low=0
    )
    prefix_cache_mb: int = _key(
        256, "memory for reusable prompt-prefix KV, in MB; 0 = off", restart=True, low=0
    )
    batch_context: int = _key(
        2048,
        "positions per request in the shared batch cache (allocated whole: max_concurrent_requests"
        " x this); longer requests decode alone; 0 = no batching",
        restart=True,
        low=0,
    )


@dataclass(frozen=True)
class ResourcesConfig(_Section):
    section = "resources"
    max_ram_mb: int = _key(0, "RAM for models, in MB; 0 = auto by contribution", low=0)
    max_gpu_vram_mb: int = _key(0, "GPU memory for models, in MB; 0 = auto by contribution", low=0)
    max_disk_mb: int = _key(50000, "disk for stored models, in MB", low=0)
    max_cpu_threads: int = _key(0, "CPU threads; 0 = auto by contribution", low=0)


@dataclass(frozen=True)
class NetworkConfig(_Section):
    section = "network"
    bootstrap_peers: list[str] = field(
        default_factory=list, metadata=_metadata("peers contacted first, as host:port")
    )
    enable_mdns: bool = _key(True, "find peers on the local network")
    gossip_network_id: str = _key("swarm", "only peers with the same id are joined")
    listen_address: str = _key("127.0.0.1", "address the peer port binds", restart=True)
    peer_port: int = _key(0, "peer port; 0 = any free port", restart=True, low=0, high=65535)
    peer_exchange: bool = _key(True, "learn peers from peers")
    max_peers: int = _key(150, "most peers kept", low=1)
    dht_port: int = _key(0, "UDP port of the DHT; 0 = any free port", restart=True, low=0, high=65535)
    record_ttl_s: int = _key(120, "seconds a published DHT record stays valid", low=10)
    stage_timeout_s: float = _key(
        20.0, "seconds a pipeline stage may stall before the route fails over", above=0
    )
    failover_timeout_s: float = _key(
        120.0, "seconds spent finding a new route before a request fails", above=0
    )
    prefix_sharing: bool = _key(
        False,
        "share prompt-prefix KV with peers and fetch it from them (peers then hold your prompts' and"
        " replies' KV)",
        restart=True,
    )


@dataclass(frozen=True)
class PoolConfig(_Section):
    section = "pool"
    max_pool_size: int = _key(10, "most members of a private pool", low=1)
    invitation_ttl_hours: int = _key(24, "how long a pool invitation stays valid", low=1, high=720)
    private_mode: bool = _key(
        False, "route this node's requests only through pool members (it still serves everyone)"
    )
    private_mode_allow_lan: bool = _key(
        True, "in private mode, also route through peers on the local network"
    )
    offline_mode: bool = _key(
        False,
        "no DHT bootstrap, invite codes, peer cache or peer exchange: only peers found on the LAN (mDNS)",
    )


@dataclass(frozen=True)
class AutoManageConfig(_Section):
    section = "auto_manage"
    enabled: bool = _key(False, "fetch and drop shards to keep models available")
    max_storage_mb: int = _key(0, "disk it may use, in MB; 0 = resources.max_disk_mb", low=0)
    interval_minutes: int = _key(5, "minutes between passes", low=1)
    min_replicas: int = _key(2, "copies of each shard to aim for", low=1)


@dataclass(frozen=True)
class ProvidersConfig(_Section):
    section = "providers"
    enabled: bool = _key(False, "forward to cloud providers (none are built in yet)")


@dataclass(frozen=True)
class UpdatesConfig(_Section):
    section = "updates"
    mode: str = _key("off", "off, or notify when a newer release exists", choices=("off", "notify"))
    check_interval_hours: int = _key(24, "hours between update checks", low=1)


@dataclass(frozen=True)
class LoggingConfig(_Section):
    section = "logging"
    level: str = _key("info", "log level", choices=("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    auto_manage: AutoManageConfig = field(default_factory=AutoManageConfig)
    providers: ProvidersConfig = field(default_factory=ProvidersConfig)
    updates: UpdatesConfig = field(default_factory=UpdatesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every value, as plain YAML/JSON data: `{section: {key: value}}`."""
        return dataclasses.asdict(self)

    def non_defaults(self) -> dict[str, dict[str, Any]]:
        """Only the values that differ from the defaults, sections without any left out."""
        defaults = Config().to_dict()
        changed = {
            section: {name: value for name, value in values.items() if value != defaults[section][name]}
            for section, values in self.to_dict().items()
        }
        return {section: values for section, values in changed.items() if values}


def _type_name(kind: Any) -> str:
    return "list[str]" if kind == list[str] else kind.__name__


_SECTIONS: dict[str, type] = typing.get_type_hints(Config)
_FIELDS: dict[str, dict[str, dataclasses.Field[Any]]] = {
    section: {item.name: item for item in dataclasses.fields(cls)} for section, cls in _SECTIONS.items()
}
# Type names ("int", "list[str]") of every key, resolved from the annotations.
_TYPES: dict[str, dict[str, str]] = {
    section: {
        name: _type_name(kind)
        for name, kind in typing.get_type_hints(cls).items()
        if name in _FIELDS[section]
    }
    for section, cls in _SECTIONS.items()
}
_EXPECTED = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "list[str]": "a list of strings",
}
_BOOLEANS = {word: True for word in ("true", "1", "yes", "on")} | {
    word: False for word in ("false", "0", "no", "off")
}


def _split(key: str, where: str = "") -> tuple[str, str]:
    """`section.name` for a known key, else ConfigError naming it (and `where` it was found)."""
    section, _, name = key.partition(".")
    if name not in _FIELDS.get(section, {}):
        raise ConfigError(f"unknown config key {key} {where}".rstrip())
    return section, name


def _default(section: str, name: str) -> Any:
    return getattr(getattr(Config(), section), name)


def _coerce(key: str, value: Any) -> Any:
    """`value` (already YAML/JSON/Python data) checked against the key's type."""
    section, name = _split(key)
    kind = _TYPES[section][name]
    if kind == "bool":
        valid = isinstance(value, bool)
    elif kind == "int":
        valid = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        valid = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if valid else value
    elif kind == "str":
        valid = isinstance(value, str)
    else:
        valid = isinstance(value, list | tuple) and all(isinstance(item, str) for item in value)
        value = list(value) if valid else value
    if not valid:
        raise ConfigError(f"config key {key} must be {_EXPECTED[kind]}, got {value!r}")
    return value


def parse_value(key: str, raw: str) -> Any:
    """The typed value of `key` written as text (an environment variable, `--set key=value`)."""
    section, name = _split(key)
    kind = _TYPES[section][name]
    text = raw.strip()
    try:
        if kind == "bool":
            return _BOOLEANS[text.lower()]
        if kind == "int":
            return int(text)
        if kind == "float":
            return _coerce(key, float(text))
    except (KeyError, ValueError):
        raise ConfigError(f"config key {key} must be {_EXPECTED[kind]}, got {raw!r}") from None
    if kind == "list[str]":
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def _build(values: Mapping[str, Mapping[str, Any]]) -> Config:
    return Config(**{section: cls(**values.get(section, {})) for section, cls in _SECTIONS.items()})


def _set(values: dict[str, dict[str, Any]], key: str, value: Any, where: str) -> None:
    """Check `value` for `key` and the config it makes; errors say where the value came from."""
    section, name = _split(key, where)
    try:
        values.setdefault(section, {})[name] = _coerce(key, value)
        _build(values)
    except ConfigError as error:
        raise ConfigError(f"{error} {where}") from None


def _set_nested(values: dict[str, dict[str, Any]], data: Any, where: str) -> None:
    """Apply `{section: {key: value}}`; a null value means the key's default."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config {where} must be a mapping of sections, got {type(data).__name__}")
    for section, items in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"unknown config section {section} {where}")
        if items is None:
            continue
        if not isinstance(items, Mapping):
            raise ConfigError(f"config section {section} {where} must be a mapping, got {items!r}")
        for name, value in items.items():
            key = f"{section}.{name}"
            _set(values, key, _default(*_split(key, where)) if value is None else value, where)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}".replace("\n", " ")) from None


def _environment(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """`(variable, key)` for every `SWARM_*` variable; one that names no key is an error."""
    sections = sorted(_SECTIONS, key=len, reverse=True)  # longest first: auto_manage before a shorter one
    found = []
    for variable in sorted(environ):
        if not variable.startswith("SWARM_") or variable.startswith(_IGNORED_ENVIRONMENT_PREFIXES):
            continue
        rest = variable.removeprefix("SWARM_")
        section = next((name for name in sections if rest.startswith(name.upper() + "_")), None)
        name = rest[len(section) + 1 :].lower() if section else ""
        if section is None or name not in _FIELDS[section]:
            raise ConfigError(f"unknown environment variable {variable}: it names no config key")
        found.append((variable, f"{section}.{name}"))
    return found


def load_config(
    data_dir: Path, environ: Mapping[str, str], overrides: Mapping[str, Any] | None = None
) -> Config:
    """The config from defaults < `<data_dir>/config.yaml` < `SWARM_*` variables < `overrides`.

    `overrides` maps dotted keys to typed values (`{"node.listen_port": 9000}`); None = not given.
    """
    path = data_dir / CONFIG_FILE
    values: dict[str, dict[str, Any]] = {}
    data = _read_yaml(path)
    if data is not None:
        _set_nested(values, data, f"in {path}")
    for variable, key in _environment(environ):
        try:
            value = parse_value(key, environ[variable])
        except ConfigError as error:
            raise ConfigError(f"{error} (from {variable})") from None
        _set(values, key, value, f"(from {variable})")
    for key, value in (overrides or {}).items():
        if value is None:
            _split(key, "(from command line)")
        else:
            _set(values, key, value, "(from command line)")
    return _build(values)


def apply_updates(config: Config, updates: Mapping[str, Any]) -> Config:
    """`config` with `{section: {key: value}}` applied (null = back to the default), checked as a
    config file is; on any error nothing is applied."""
    values = config.to_dict()
    _set_nested(values, updates, "in update")
    return _build(values)


def save_config(data_dir: Path, config: Config) -> Path:
    """Write the values of `config` that differ from the defaults to `<data_dir>/config.yaml`."""
    path = data_dir / CONFIG_FILE
    header = "# swarm node config: only values that differ from the defaults are kept here.\n"
    changed = config.non_defaults()
    atomic_write_text(path, header + (yaml.safe_dump(changed, sort_keys=False) if changed else ""))
    return path


def restart_keys(old: Config, new: Config) -> list[str]:
    """Dotted names of the changed keys that take effect only after a restart."""
    return [
        f"{section}.{name}"
        for section, items in _FIELDS.items()
        for name, item in items.items()
        if item.metadata["restart"]
        and getattr(getattr(old, section), name) != getattr(getattr(new, section), name)
    ]


def describe() -> list[dict[str, Any]]:
    """Every key: dotted name, type name, default, whether it needs a restart, what it does, and
    its limits (`choices`, `low`/`high` inclusive, `above` exclusive) where it has any."""
    return [
        {
            "key": f"{section}.{name}",
            "type": _TYPES[section][name],
            "default": _default(section, name),
            "restart": item.metadata["restart"],
            "doc": item.metadata["doc"],
            **{
                limit: item.metadata[limit]
                for limit in ("choices", "low", "high", "above")
                if limit in item.metadata
            },
        }
        for section, items in _FIELDS.items()
        for name, item in items.items()
    ]


def ensure_api_key(data_dir: Path, configured: str = "") -> str:
    """`configured` if set, else the key in `<data_dir>/api_key`, created (mode 0600) on first use."""
    if configured:
        return configured
    path = data_dir / API_KEY_FILE
    try:
        existing: str | None = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        existing = None
    if existing:
        return existing
    key = "sk-swarm-" + secrets.token_urlsafe(32)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = data_dir / f".{API_KEY_FILE}.{secrets.token_hex(8)}.tmp"
    # Created 0600 from the start so the key is never readable by others, even briefly.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(key + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if existing is None:
            # Linked only if no key is there yet: processes starting at once (control-plane
            # workers) all end up with the first one's key, never each with its own.
            os.link(temporary, path)
        else:  # an empty file (never one of ours: keys appear whole) is replaced
            os.replace(temporary, path)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip()
    finally:
        temporary.unlink(missing_ok=True)
    os.chmod(path, 0o600)
    return key
