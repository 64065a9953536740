"""The dashboard: static pages and the routes that serve them.

Owns nothing but assets: every number the pages show comes from the JSON APIs
(`/health/ready`, `/v1/models`, `/api/admin/stats`), fetched by `static/app.js`
with the API key the page gets from `/api/admin/api-key` (loopback only) or the
user types in. Must not import jax.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, send_from_directory

STATIC = Path(__file__).parent / "static"

bp = Blueprint("webui", __name__, static_folder=str(STATIC), static_url_path="/static")


@bp.get("/")
def index():
    response = send_from_directory(STATIC, "index.html")
    response.headers["Cache-Control"] = "no-cache"
    return response
