"""The dashboard's files: served without a key under CSP, wired to real routes and strings.

Static checks over `webui/static/`: every module and asset the page loads exists, every
API path a page calls is a route of the app, every string key a page uses is in the
English catalog, and no page writes HTML from strings (model output must stay text).
The pages in a browser are tested by tests/test_browser.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx2

STATIC = Path(__file__).resolve().parent.parent / "webui" / "static"
SCRIPTS = sorted(STATIC.glob("*.js"))
PAGES = ("setup", "chat", "models", "network", "compare", "credits", "pool", "settings")


def _client(app, address="127.0.0.1"):
    return httpx2.Client(
        transport=httpx2.WSGITransport(app=app, remote_addr=address), base_url="http://127.0.0.1"
    )


def _catalog() -> set[str]:
    return set(re.findall(r'^\s*"([\w.]+)":', (STATIC / "strings-en.js").read_text(), re.MULTILINE))


def test_dashboard_is_served_without_a_key(control_app):
    with _client(control_app) as client:
        page = client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
            assert client.get(asset).status_code == 200, asset


def test_every_module_import_resolves_and_is_served_as_javascript(control_app):
    with _client(control_app) as client:
        for script in SCRIPTS:
            for name in re.findall(r'^import .*? from "\./([^"]+)";', script.read_text(), re.MULTILINE):
                assert (STATIC / name).is_file(), f"{script.name} imports missing {name}"
            reply = client.get(f"/static/{script.name}")
            assert reply.status_code == 200
            assert "javascript" in reply.headers["content-type"], script.name


def test_every_page_is_routed_and_linked():
    app = (STATIC / "app.js").read_text()
    index = (STATIC / "index.html").read_text()
    for page in PAGES:
        assert (STATIC / f"page-{page}.js").is_file()
        assert f'import * as {page} from "./page-{page}.js"' in app
        assert f'href="#/{page}"' in index


def test_every_api_path_the_pages_call_exists(control_app):
    source = "\n".join(script.read_text() for script in SCRIPTS)
    literal = set(re.findall(r'(?:api|events|fetch)\("(/[^"?]+)"', source))
    templated = set(re.findall(r"(?:api|events)\(`(/[^`]+)`", source))
    assert {"/health/state", "/api/admin/api-key", "/v1/models", "/v1/chat/completions"} <= literal
    assert {"/api/dashboard/models", "/api/dashboard/network/stream", "/api/admin/config"} <= literal
    routes = [rule.rule for rule in control_app.url_map.iter_rules()]
    for path in literal:
        assert path in routes, path
    patterns = [re.compile(re.sub(r"<(?:\w+:)?\w+>", "[^/]+", rule) + "$") for rule in routes]
    for path in templated:
        concrete = re.sub(r"\$\{[^}]+\}", "some-model", path)
        assert any(pattern.match(concrete) for pattern in patterns), path


def test_every_string_key_is_in_the_catalog():
    catalog = _catalog()
    source = "\n".join(script.read_text() for script in SCRIPTS if script.name != "strings-en.js")
    used = set(
        re.findall(
            r'"((?:common|setup|chat|models|network|compare|credits|pool|settings|nav)\.[\w.]+)"', source
        )
    )
    used |= set(re.findall(r'data-i18n(?:-label|-title)?="([\w.]+)"', (STATIC / "index.html").read_text()))
    assert used, "no keys found: the pattern is stale"
    assert used <= catalog, sorted(used - catalog)
    # Keys built at run time (`setup.step.${name}`) must have an entry for every value.
    for prefix, values in {
        "nav.": PAGES,
        "state.": ("ready", "loading", "failed", "down"),
        "theme.": ("system", "light", "dark"),
        "setup.pull.": ("running", "done", "failed", "interrupted"),
        "setup.loading.": ("loading", "ready", "failed", "down"),
        "network.column.": ("peer", "address", "layers", "latency", "source", "seen"),
        "credits.tier.": ("platinum", "gold", "silver", "bronze"),
    }.items():
        assert {prefix + value for value in values} <= catalog, prefix


def test_no_page_writes_html_from_strings():
    for script in SCRIPTS:
        text = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in text, f"{script.name} uses {sink}"


def test_no_inline_script_or_style_that_the_csp_would_block():
    index = (STATIC / "index.html").read_text()
    assert "<style" not in index
    assert not re.search(r"\s(?:style|on\w+)=", index), "inline styles and handlers break under the CSP"
    assert re.findall(r"<script[^>]*>", index) == ['<script type="module" src="/static/app.js">']
    for script in SCRIPTS:
        assert '"style"' not in script.read_text() and 'setAttribute("style' not in script.read_text()


def test_api_key_is_given_to_loopback_only(control_app, api_key):
    with _client(control_app) as client:
        assert client.get("/api/admin/api-key").json()["api_key"] == api_key
    with _client(control_app, "192.0.2.7") as client:
        assert client.get("/api/admin/api-key").status_code == 403
