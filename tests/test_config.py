"""Config layering (defaults < config.yaml < SWARM_* < overrides), validation, saving and the API key."""

from __future__ import annotations

import dataclasses
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from swarm.config import (
    Config,
    ConfigError,
    apply_updates,
    describe,
    ensure_api_key,
    load_config,
    parse_value,
    restart_keys,
    save_config,
)
from swarm.errors import InvalidRequestError


def write_yaml(data_dir: Path, text: str) -> Path:
    path = data_dir / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_config_file(tmp_path: Path) -> None:
    config = load_config(tmp_path, {})
    assert config == Config()
    assert config.node.listen_port == 8800
    assert config.node.host == "127.0.0.1"
    assert config.node.model == "smollm2-135m"
    assert config.api.workers == 1
    assert config.api.rate_limit_rpm == 600
    assert config.api.cors_origins == []
    assert config.inference.kv_cache == "f16"
    assert config.resources.max_disk_mb == 50000
    assert config.network.max_peers == 150
    assert config.auto_manage.min_replicas == 2
    assert config.logging.level == "info"
    assert config.non_defaults() == {}


def test_empty_file_and_empty_section_are_defaults(tmp_path: Path) -> None:
    write_yaml(tmp_path, "")
    assert load_config(tmp_path, {}) == Config()
    write_yaml(tmp_path, "api:\n")
    assert load_config(tmp_path, {}) == Config()


def test_yaml_overrides_defaults(tmp_path: Path) -> None:
    write_yaml(
        tmp_path,
        "node:\n  listen_port: 9100\n  contribution: maximum\n"
        "api:\n  max_body_mb: 8\n  cors_origins: [https://a.example]\n"
        "auto_manage:\n  enabled: true\n",
    )
    config = load_config(tmp_path, {})
    assert config.node.listen_port == 9100
    assert config.node.contribution == "maximum"
    assert config.api.max_body_mb == 8.0 and isinstance(config.api.max_body_mb, float)
    assert config.api.cors_origins == ["https://a.example"]
    assert config.auto_manage.enabled is True
    assert config.api.workers == 1


def test_yaml_null_means_default(tmp_path: Path) -> None:
    write_yaml(tmp_path, "api:\n  workers: null\n  rate_limit_rpm: 30\n")
    config = load_config(tmp_path, {})
    assert config.api.workers == 1
    assert config.api.rate_limit_rpm == 30


def test_environment_overrides_yaml(tmp_path: Path) -> None:
    write_yaml(tmp_path, "api:\n  rate_limit_rpm: 100\n")
    environ = {
        "SWARM_API_RATE_LIMIT_RPM": "30",
        "SWARM_NODE_LISTEN_PORT": "9001",
        "SWARM_AUTO_MANAGE_ENABLED": "Yes",
        "SWARM_AUTO_MANAGE_MIN_REPLICAS": "3",
        "SWARM_NETWORK_ENABLE_MDNS": "off",
        "SWARM_NETWORK_BOOTSTRAP_PEERS": " 10.0.0.1:8801, ,10.0.0.2:8801,",
        "SWARM_API_REQUEST_TIMEOUT_S": "12.5",
        "SWARM_NODE_DATA_DIR": "/somewhere",
        "SWARM_TEST_DATA_DIR": "/ignored",
        "SWARM_INTERNAL_WORKER_ID": "3",
        "PATH": "/usr/bin",
    }
    config = load_config(tmp_path, environ)
    assert config.api.rate_limit_rpm == 30
    assert config.node.listen_port == 9001
    assert config.auto_manage.enabled is True
    assert config.auto_manage.min_replicas == 3
    assert config.network.enable_mdns is False
    assert config.network.bootstrap_peers == ["10.0.0.1:8801", "10.0.0.2:8801"]
    assert config.api.request_timeout_s == 12.5
    assert config.node.data_dir == "/somewhere"


def test_command_line_beats_environment_beats_yaml(tmp_path: Path) -> None:
    write_yaml(tmp_path, "node:\n  listen_port: 9100\n  model: from-yaml\n")
    environ = {"SWARM_NODE_LISTEN_PORT": "9200", "SWARM_LOGGING_LEVEL": "debug"}
    config = load_config(tmp_path, environ, {"node.listen_port": 9300, "api.workers": None})
    assert config.node.listen_port == 9300
    assert config.node.model == "from-yaml"
    assert config.logging.level == "debug"
    assert config.api.workers == 1


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("inference:\n  max_contxt: 4096\n", "unknown config key inference.max_contxt in "),
        ("infrence:\n  max_context: 4096\n", "unknown config section infrence in "),
        ("- just\n- a list\n", "must be a mapping of sections"),
        ("api: 3\n", "config section api in "),
        ("api:\n  workers: two\n", "config key api.workers must be an integer, got 'two'"),
        ("api:\n  metrics_auth_required: yes please\n", "config key api.metrics_auth_required must be"),
        ("api:\n  max_body_mb: true\n", "config key api.max_body_mb must be a number"),
        ("node:\n  listen_port: '9000'\n", "config key node.listen_port must be an integer"),
        ("network:\n  bootstrap_peers: [1, 2]\n", "config key network.bootstrap_peers must be a list"),
        ("api:\n  workers: 0\n", "config key api.workers must be between 1 and 64, got 0"),
        ("node:\n  listen_port: 70000\n", "config key node.listen_port must be between 0 and 65535"),
        ("api:\n  max_body_mb: 0\n", "config key api.max_body_mb must be greater than 0"),
        ("resources:\n  max_ram_mb: -1\n", "config key resources.max_ram_mb must be at least 0"),
        ("inference:\n  weights: q4\n", "config key inference.weights must be one of auto, f32, packed"),
        ("node: [unclosed\n", "cannot read config file"),
    ],
)
def test_bad_yaml_names_the_key_and_file(tmp_path: Path, text: str, named: str) -> None:
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path, {})
    assert named in str(raised.value)
    assert str(path) in str(raised.value)
    assert isinstance(raised.value, InvalidRequestError)


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"SWARM_API_WORKRS": "2"}, "SWARM_API_WORKRS"),
        ({"SWARM_NOPE_THING": "1"}, "SWARM_NOPE_THING"),
        ({"SWARM_AUTO_MANAGE": "1"}, "SWARM_AUTO_MANAGE"),
        ({"SWARM_API_WORKERS": "two"}, "config key api.workers must be an integer, got 'two'"),
        ({"SWARM_API_WORKERS": "99"}, "config key api.workers must be between 1 and 64, got 99"),
        ({"SWARM_PROVIDERS_ENABLED": "maybe"}, "config key providers.enabled must be true or false"),
        ({"SWARM_API_MAX_BODY_MB": "nan"}, "config key api.max_body_mb must be a number"),
    ],
)
def test_bad_environment_names_the_variable(tmp_path: Path, environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path, environ)
    assert named in str(raised.value)
    assert next(iter(environ)) in str(raised.value)


def test_bad_override_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key node\.port \(from command line\)"):
        load_config(tmp_path, {}, {"node.port": 9000})
    with pytest.raises(ConfigError, match=r"unknown config key port"):
        load_config(tmp_path, {}, {"port": None})
    with pytest.raises(ConfigError, match=r"node\.listen_port must be an integer, got '9000'"):
        load_config(tmp_path, {}, {"node.listen_port": "9000"})


def test_parse_value_types() -> None:
    assert parse_value("node.listen_port", " 9000 ") == 9000
    assert parse_value("api.max_body_mb", "1.5") == 1.5
    for word in ("true", "TRUE", "1", "yes", "On"):
        assert parse_value("pool.offline_mode", word) is True
    for word in ("false", "0", "No", "off"):
        assert parse_value("pool.offline_mode", word) is False
    assert parse_value("api.cors_origins", "") == []
    assert parse_value("api.cors_origins", "a, b") == ["a", "b"]
    assert parse_value("network.gossip_network_id", "lab") == "lab"
    with pytest.raises(ConfigError, match=r"unknown config key api\.nope"):
        parse_value("api.nope", "1")


def test_apply_updates_validates_and_keeps_original(tmp_path: Path) -> None:
    original = load_config(tmp_path, {})
    updated = apply_updates(original, {"api": {"rate_limit_rpm": 30}, "logging": {"level": "debug"}})
    assert updated.api.rate_limit_rpm == 30
    assert updated.logging.level == "debug"
    assert original.api.rate_limit_rpm == 600
    assert apply_updates(updated, {"api": {"rate_limit_rpm": None}}).api.rate_limit_rpm == 600

    bad_updates = [
        {"api": {"rate_limit_rpm": 30, "workrs": 2}},
        {"api": {"rate_limit_rpm": 30, "workers": "2"}},
        {"api": {"rate_limit_rpm": 30}, "logging": {"level": "loud"}},
        {"apis": {"rate_limit_rpm": 30}},
    ]
    for bad in bad_updates:
        with pytest.raises(ConfigError):
            apply_updates(updated, bad)
    assert updated.api.rate_limit_rpm == 30
    assert updated.logging.level == "debug"


def test_save_writes_only_non_defaults_and_reads_back(tmp_path: Path) -> None:
    config = apply_updates(
        Config(),
        {
            "node": {"listen_port": 9100},
            "network": {"bootstrap_peers": ["a:1", "b:2"], "gossip_network_id": "yes"},
            "api": {"max_body_mb": 4.5, "metrics_auth_required": True},
        },
    )
    data_dir = tmp_path / "fresh"
    path = save_config(data_dir, config)
    assert path == data_dir / "config.yaml"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#")
    assert yaml.safe_load(text) == config.non_defaults()
    assert yaml.safe_load(text) == {
        "node": {"listen_port": 9100},
        "api": {"max_body_mb": 4.5, "metrics_auth_required": True},
        "network": {"bootstrap_peers": ["a:1", "b:2"], "gossip_network_id": "yes"},
    }
    assert load_config(data_dir, {}) == config

    save_config(data_dir, Config())
    assert yaml.safe_load(path.read_text(encoding="utf-8")) is None
    assert load_config(data_dir, {}) == Config()


def test_restart_keys() -> None:
    old = Config()
    new = dataclasses.replace(
        old,
        node=dataclasses.replace(old.node, listen_port=9000, contribution="moderate"),
        inference=dataclasses.replace(old.inference, kv_cache="f32"),
        api=dataclasses.replace(old.api, rate_limit_rpm=5),
    )
    assert restart_keys(old, new) == ["node.listen_port", "inference.kv_cache"]
    assert restart_keys(old, old) == []


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"config key logging\.level must be one of"):
        dataclasses.replace(Config().logging, level="loud")


def test_describe_lists_every_key() -> None:
    entries = {entry["key"]: entry for entry in describe()}
    assert len(entries) == sum(len(values) for values in Config().to_dict().values())
    assert entries["api.workers"] == {
        "key": "api.workers",
        "type": "int",
        "default": 1,
        "restart": True,
        "doc": entries["api.workers"]["doc"],
        "low": 1,
        "high": 64,
    }
    assert entries["network.bootstrap_peers"]["type"] == "list[str]"
    assert entries["api.rate_limit_rpm"]["restart"] is False


def test_api_key_created_private_and_stable(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    key = ensure_api_key(data_dir)
    assert key.startswith("sk-swarm-") and len(key) > 40
    path = data_dir / "api_key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) & 0o077 == 0
    assert ensure_api_key(data_dir) == key
    assert ensure_api_key(data_dir, "configured-key") == "configured-key"
    assert path.read_text(encoding="utf-8").strip() == key
    assert [item.name for item in data_dir.iterdir()] == ["api_key"]


def test_api_key_empty_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "api_key").write_text("  \n", encoding="utf-8")
    key = ensure_api_key(tmp_path)
    assert key.startswith("sk-swarm-")
    assert ensure_api_key(tmp_path) == key


def test_import_does_not_pull_in_jax() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import swarm.config, sys; assert 'jax' not in sys.modules"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_processes_starting_at_once_all_get_the_one_key(tmp_path):
    """Control-plane workers started together (gunicorn without the supervisor) each make
    sure of the key: exactly one key is created, and every one of them answers with it."""
    import threading

    from swarm.config import ensure_api_key

    for attempt in range(20):
        data_dir = tmp_path / f"run-{attempt}"
        barrier = threading.Barrier(6)
        keys: list[str] = []

        def start(barrier=barrier, keys=keys, data_dir=data_dir) -> None:
            barrier.wait()
            keys.append(ensure_api_key(data_dir))

        threads = [threading.Thread(target=start) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stored = (data_dir / "api_key").read_text().strip()
        assert set(keys) == {stored}, attempt
        assert [p.name for p in data_dir.iterdir()] == ["api_key"]  # no temporary file left
