"""Shared fixtures: the test data dir, tiny random GGUF models, and the real models.

The data dir (`.test-data/` in the checkout unless SWARM_TEST_DATA_DIR says otherwise)
persists between runs only as a cache: assembled Gemma parts and parsed-metadata caches.
Real models are installed by `make models` (which `make test` runs first); a missing one
fails the tests that need it with the command that installs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.control_fixtures import api_key, control_app, control_overrides, http, mock_backend, node_server  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "llamacpp"


def _data_dir() -> Path:
    return Path(os.environ.get("SWARM_TEST_DATA_DIR", REPO / ".test-data"))


def pytest_configure(config: pytest.Config) -> None:
    # Compiled XLA programs persist between runs, as they do for users.
    from swarm.engine import enable_compilation_cache

    enable_compilation_cache(_data_dir() / "cache" / "xla")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: Path):
    """Returns a function spec_name -> path of that tiny GGUF (written once)."""
    from tests.tiny_models import write_tiny_model

    def make(spec_name: str) -> Path:
        path = tiny_dir / f"{spec_name}.gguf"
        if not path.exists():
            write_tiny_model(path, spec_name)
        return path

    return make


def load_fixture(name: str) -> dict:
    path = FIXTURES / f"{name}.json"
    if not path.exists():
        pytest.fail(f"missing fixture {path}: regenerate with tools/make_fixtures.py")
    return json.loads(path.read_text(encoding="utf-8"))


def _real_model_path(name: str, data_dir: Path) -> Path:
    from swarm.errors import SwarmError
    from swarm.models import resolve_model

    try:
        return resolve_model(name, data_dir, install_missing=False)
    except SwarmError as error:
        pytest.fail(f"{error} -- run `make models` first")


@pytest.fixture(scope="session")
def smollm2_path(data_dir: Path) -> Path:
    return _real_model_path("smollm2-135m", data_dir)


@pytest.fixture(scope="session")
def gemma3_path(data_dir: Path) -> Path:
    return _real_model_path("gemma3-270m", data_dir)


@pytest.fixture(scope="session")
def opened_models(data_dir: Path):
    """Returns a function name -> OpenedModel, each opened once per test run."""
    from swarm.loader import open_model

    opened = {}

    def get(name: str):
        if name not in opened:
            _real_model_path(name, data_dir)
            opened[name] = open_model(name, data_dir, install_missing=False)
        return opened[name]

    return get


@pytest.fixture(scope="session")
def real_engines(opened_models):
    """Returns a function name -> whole-model Engine with default settings, built once."""
    engines = {}

    def get(name: str):
        if name not in engines:
            engines[name] = opened_models(name).engine()
        return engines[name]

    return get
