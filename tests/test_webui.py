"""The dashboard page: served without a key, locked down by CSP, and wired to real routes."""

from __future__ import annotations

import re
from pathlib import Path

import httpx2

APP_JS = Path(__file__).resolve().parent.parent / "webui" / "static" / "app.js"


def test_dashboard_is_served_without_a_key(control_app):
    with httpx2.Client(
        transport=httpx2.WSGITransport(app=control_app), base_url="http://127.0.0.1"
    ) as client:
        page = client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
            assert client.get(asset).status_code == 200, asset


def test_every_api_path_the_page_calls_exists(control_app):
    paths = set(re.findall(r'fetch\("(/[^"]+)"', APP_JS.read_text()))
    assert paths >= {"/health/ready", "/api/admin/api-key", "/v1/models", "/v1/chat/completions"}
    routes = {rule.rule for rule in control_app.url_map.iter_rules()}
    assert paths <= routes
