"""The dashboard: static pages and the route that serves them.

Owns nothing but assets. The page is one document (`static/index.html`) whose ES
modules (`static/app.js` and the `page-*.js` it mounts by URL hash) render every page:
setup wizard, chat, models, network map, compare, credits, settings. Every number they
show comes from the JSON APIs (`/health/ready`, `/v1/*`, `/api/admin/*`,
`/api/dashboard/*`), fetched with the API key the page gets from `/api/admin/api-key`
(loopback only) or the user types in. Every string comes from `static/strings-en.js`.
No build step, no third-party code; the pages run under the control plane's CSP
(`default-src 'self'`: no inline scripts or styles). Must not import jax.
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
