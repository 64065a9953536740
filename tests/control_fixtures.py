"""Fixtures for control-plane tests: a mock node on a unix socket and the Flask app.

`control_app` is the real app from `control.app.create_app`, talking over a real
unix socket to a `NodeServer` whose backend is `tests.mock_backend.MockBackend`
(override the `mock_backend` fixture for delays or a loading state). `http` is an
httpx2 client that drives the app in-process (WSGI) with the API key set; the
official SDKs take it as `http_client=`.
"""

from __future__ import annotations

import httpx2
import pytest

from swarm.node_protocol import SOCKET_NAME
from swarm.node_server import NodeServer
from tests.mock_backend import MockBackend


@pytest.fixture
def mock_backend() -> MockBackend:
    return MockBackend()


@pytest.fixture
def node_server(tmp_path, mock_backend):
    server = NodeServer(tmp_path / SOCKET_NAME, mock_backend, max_active=4, max_waiting=64)
    server.serve_in_thread()
    yield server
    server.close()


@pytest.fixture
def control_overrides() -> dict:
    """Config overrides (dotted keys) for `control_app`; override in a test module."""
    return {"api.rate_limit_rpm": 0, "api.rate_limit_admin_rpm": 0}


@pytest.fixture
def control_app(tmp_path, node_server, control_overrides):
    from control.app import create_app
    from swarm.config import load_config

    config = load_config(tmp_path, {}, control_overrides)
    app = create_app(config, tmp_path)
    app.testing = True
    return app


@pytest.fixture
def api_key(control_app) -> str:
    return control_app.config["API_KEY"]


@pytest.fixture
def http(control_app, api_key):
    transport = httpx2.WSGITransport(app=control_app, remote_addr="127.0.0.1")
    with httpx2.Client(
        transport=transport, base_url="http://127.0.0.1", headers={"Authorization": f"Bearer {api_key}"}
    ) as client:
        yield client
