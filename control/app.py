"""The control plane's Flask application factory.

Owns `create_app`, which wires the config, the API key, the node client and one
blueprint per area (health and metrics, admin, credits, pools, dashboard, OpenAI, Anthropic, MCP, the
pages), and the accessors handlers use to reach them. The app never imports jax: it reaches the
node only through `control.node_client`. Served by gunicorn with gevent workers
(`control.wsgi:app`); tests build it directly with a config and a data dir.
"""

from __future__ import annotations

from pathlib import Path

from flask import Flask, current_app

from control import (
    admin,
    anthropic_api,
    credits_api,
    dashboard_api,
    health,
    mcp_api,
    middleware,
    openai_api,
    pool_api,
)
from control.node_client import NodeClient
from swarm.config import Config, ensure_api_key
from swarm.node_protocol import SOCKET_NAME
from webui import bp as webui_bp


def create_app(config: Config, data_dir: Path, *, node: NodeClient | None = None) -> Flask:
    app = Flask("control", static_folder=None)  # the dashboard blueprint serves /static
    app.config["SWARM"] = config
    app.config["DATA_DIR"] = Path(data_dir)
    app.config["MAX_CONTENT_LENGTH"] = int(config.api.max_body_mb * 2**20)
    app.config["API_KEY"] = ensure_api_key(Path(data_dir), config.api.key)
    app.extensions["swarm.node"] = node or NodeClient(
        Path(data_dir) / SOCKET_NAME, request_timeout_s=config.api.request_timeout_s
    )
    middleware.init_app(app)
    for blueprint in (
        health.bp,
        admin.bp,
        credits_api.bp,
        dashboard_api.bp,
        pool_api.bp,
        openai_api.bp,
        anthropic_api.bp,
        mcp_api.bp,
        webui_bp,
    ):
        app.register_blueprint(blueprint)
    return app


def node() -> NodeClient:
    """The node client of the running app."""
    return current_app.extensions["swarm.node"]


def settings() -> Config:
    """The config the running app was built (or last reloaded) with."""
    return current_app.config["SWARM"]
