"""The control plane's core: health, auth, CORS, limits, errors, admin config, metrics.

Drives the real Flask app in-process (WSGI) against a mock node on a unix socket;
the integration test at the end serves it with gunicorn + gevent on loopback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import yaml

from control.middleware import RequestIdFilter, json_body
from swarm.config import load_config
from swarm.local_swarm import free_port
from swarm.node_protocol import SOCKET_NAME
from swarm.node_server import NodeServer
from tests.mock_backend import MockBackend

REPO = Path(__file__).resolve().parent.parent


def client_for(app, *, remote_addr: str = "127.0.0.1", headers: dict | None = None) -> httpx2.Client:
    """A client without the API key (unless given in `headers`) from `remote_addr`."""
    transport = httpx2.WSGITransport(app=app, remote_addr=remote_addr)
    return httpx2.Client(transport=transport, base_url="http://127.0.0.1", headers=headers or {})


def assert_openai_error(response: httpx2.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


def assert_anthropic_error(response: httpx2.Response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == kind
    assert body["request_id"] == response.headers["x-request-id"]
    return body


# --- health -------------------------------------------------------------------------


def test_health_needs_no_key_and_never_asks_the_node(control_app, node_server):
    node_server.close()
    with client_for(control_app) as anonymous:
        response = anonymous.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_when_the_model_is_loaded(control_app):
    with client_for(control_app) as anonymous:
        response = anonymous.get("/health/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["subsystems"] == {"control": True, "node": True, "model": True}
    assert body["node"]["state"] == "ready"


@pytest.mark.parametrize("mock_backend", [MockBackend(state="loading")])
def test_not_ready_while_the_model_loads(control_app):
    with client_for(control_app) as anonymous:
        response = anonymous.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["subsystems"] == {"control": True, "node": True, "model": False}
    assert int(response.headers["retry-after"]) >= 1
    with client_for(control_app) as anonymous:
        polled = anonymous.get("/health/state")  # the same answer, with 200, for pages
    assert polled.status_code == 200
    assert polled.json()["subsystems"] == response.json()["subsystems"]
    assert polled.json()["node"]["state"] == "loading"


def test_not_ready_when_the_node_is_down(control_app, node_server):
    node_server.close()
    with client_for(control_app) as anonymous:
        started = time.monotonic()
        response = anonymous.get("/health/ready")
    assert time.monotonic() - started < 3
    assert response.status_code == 503
    assert response.json()["subsystems"] == {"control": True, "node": False, "model": False}


def test_hello_probe_answers_without_a_key(control_app):
    with client_for(control_app) as anonymous:
        assert anonymous.get("/api/hello").json() == {"ok": True}
        assert anonymous.head("/api/hello").status_code == 200


# --- auth ---------------------------------------------------------------------------


def test_missing_or_wrong_key_is_401_in_openai_shape(control_app):
    with client_for(control_app) as anonymous:
        missing = anonymous.get("/v1/models")
        wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"})
    for response in (missing, wrong):
        assert assert_openai_error(response, 401)["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_missing_or_wrong_key_is_401_in_anthropic_shape(control_app):
    with client_for(control_app) as anonymous:
        missing = anonymous.post("/v1/messages", json={})
        wrong = anonymous.post("/v1/messages", json={}, headers={"x-api-key": "sk-wrong"})
    for response in (missing, wrong):
        assert_anthropic_error(response, 401, "authentication_error")


def test_non_ascii_key_is_refused_not_crashed(control_app):
    # Werkzeug's own client: httpx2's WSGI transport cannot send non-ASCII header bytes.
    response = control_app.test_client().get("/v1/models", headers={"x-api-key": "clé"})
    assert response.status_code == 401
    assert response.json["error"]["code"] == "invalid_api_key"


def test_x_api_key_header_is_accepted(control_app, api_key):
    with client_for(control_app, headers={"x-api-key": api_key}) as anthropic_v1:
        assert anthropic_v1.get("/api/admin/config").status_code == 200
        assert anthropic_v1.get("/v1/models").status_code != 401


def test_api_key_route_answers_loopback_only(control_app, api_key):
    with client_for(control_app) as local:
        response = local.get("/api/admin/api-key")
    assert response.status_code == 200
    assert response.json() == {"api_key": api_key, "header": f"Authorization: Bearer {api_key}"}
    with client_for(control_app, remote_addr="10.0.0.5") as remote:
        assert_openai_error(remote.get("/api/admin/api-key"), 403)
        with_key = remote.get("/api/admin/api-key", headers={"Authorization": f"Bearer {api_key}"})
        assert_openai_error(with_key, 403)


def test_metrics_need_the_key_from_other_machines(control_app, api_key):
    with client_for(control_app, remote_addr="10.0.0.5") as remote:
        assert_openai_error(remote.get("/metrics"), 401)
        assert remote.get("/metrics", headers={"Authorization": f"Bearer {api_key}"}).status_code == 200


@pytest.mark.parametrize("control_overrides", [{"api.metrics_auth_required": True}])
def test_metrics_can_require_the_key_everywhere(control_app, api_key):
    with client_for(control_app) as local:
        assert_openai_error(local.get("/metrics"), 401)
        assert local.get("/metrics", headers={"x-api-key": api_key}).status_code == 200


# --- CORS, request ids, security headers --------------------------------------------


@pytest.fixture
def control_overrides():
    return {
        "api.rate_limit_rpm": 0,
        "api.rate_limit_admin_rpm": 0,
        "api.cors_origins": ["https://tools.example"],
    }


@pytest.mark.parametrize(
    "origin", ["http://127.0.0.1:8800", "http://localhost:8800", "https://tools.example"]
)
def test_cors_allows_the_dashboard_and_configured_origins(http, origin):
    response = http.get("/api/admin/config", headers={"Origin": origin})
    assert response.headers["access-control-allow-origin"] == origin
    assert "Origin" in response.headers["vary"]
    assert "access-control-allow-credentials" not in response.headers


def test_cors_gives_other_origins_nothing_but_still_serves_plain_clients(http):
    response = http.get("/api/admin/config", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers
    assert http.get("/api/admin/config").status_code == 200  # no Origin: not a browser, served


def test_cors_preflight(control_app):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    with client_for(control_app) as anonymous:
        allowed = anonymous.options(
            "/v1/chat/completions", headers={"Origin": "http://localhost:8800", **preflight}
        )
        other = anonymous.options(
            "/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight}
        )
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:8800"
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "x-api-key" in allowed.headers["access-control-allow-headers"]
    assert other.status_code == 204
    assert "access-control-allow-origin" not in other.headers


def test_request_id_is_echoed_or_generated(http):
    echoed = http.get("/health", headers={"X-Request-Id": "client-id-42"})
    assert echoed.headers["x-request-id"] == "client-id-42"
    generated = http.get("/health", headers={"X-Request-Id": "x" * 129})
    request_id = generated.headers["x-request-id"]
    assert request_id.startswith("req_") and len(request_id) == 28
    int(request_id[4:], 16)
    assert http.get("/health").headers["x-request-id"] != request_id


def test_log_lines_carry_the_request_id(http, caplog):
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO, logger="control.access"):
        response = http.get("/api/admin/config", params={"secret": "no"}, headers={"X-Request-Id": "trace-7"})
    lines = [record for record in caplog.records if record.name == "control.access"]
    assert [record.request_id for record in lines] == ["trace-7"]
    assert "GET /api/admin/config 200" in lines[0].getMessage()
    assert "secret" not in lines[0].getMessage()
    assert response.status_code == 200


def test_security_headers(http):
    api = http.get("/api/admin/config")
    page = http.get("/")
    for response in (api, page, http.get("/nowhere")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
    assert "content-security-policy" not in api.headers
    assert "default-src 'self'" in page.headers["content-security-policy"]


# --- body limits, bad requests, errors ----------------------------------------------


@pytest.fixture
def probe_routes(control_app):
    """Throwaway routes on the test app: a JSON echo, a crash, Flask's own get_json()."""
    from flask import jsonify, request

    def echo():
        return jsonify(json_body())

    def crash():
        raise RuntimeError("secret internal detail")

    def flask_json():
        return jsonify(request.get_json())

    control_app.add_url_rule("/v1/probe/echo", "probe_echo", echo, methods=["POST"])
    control_app.add_url_rule("/v1/probe/crash", "probe_crash", crash)
    control_app.add_url_rule("/v1/probe/flask-json", "probe_flask_json", flask_json, methods=["POST"])
    return control_app


@pytest.mark.parametrize("control_overrides", [{"api.max_body_mb": 0.001}])
def test_oversized_body_is_413_in_each_dialect(http):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]})
    openai = http.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
    assert assert_openai_error(openai, 413)["code"] == "request_too_large"
    anthropic = http.post("/v1/messages", content=big, headers={"Content-Type": "application/json"})
    assert_anthropic_error(anthropic, 413, "request_too_large")
    assert http.put("/api/admin/config", content=big).status_code == 413


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe\xfa"])
def test_malformed_json_is_400_in_each_dialect(http, body):
    openai = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert assert_openai_error(openai, 400)["message"] == "request body must be a JSON object"
    anthropic = http.post("/v1/messages", content=body, headers={"Content-Type": "application/json"})
    assert_anthropic_error(anthropic, 400, "invalid_request_error")
    assert_openai_error(http.put("/api/admin/config", content=body), 400)


def test_json_body_ignores_the_content_type(probe_routes, http):
    response = http.post("/v1/probe/echo", content=b'{"a": 1}', headers={"Content-Type": "text/plain"})
    assert response.json() == {"a": 1}
    assert http.post("/v1/probe/echo", content=b'{"a": 2}').json() == {"a": 2}


def test_flask_get_json_failures_are_json_too(probe_routes, http):
    response = http.post(
        "/v1/probe/flask-json", content=b"{bad", headers={"Content-Type": "application/json"}
    )
    assert_openai_error(response, 400)


def test_unknown_route_and_wrong_method(http):
    missing = http.get("/v1/does-not-exist")
    assert "/v1/does-not-exist" in assert_openai_error(missing, 404)["message"]
    wrong = http.delete("/api/admin/config")
    assert "PUT" in assert_openai_error(wrong, 405)["message"]
    assert "GET" in wrong.headers["allow"]
    assert_anthropic_error(http.get("/v1/messages/nowhere"), 404, "not_found_error")


def test_unexpected_exception_is_500_json_without_traceback(probe_routes, http, caplog):
    with caplog.at_level(logging.ERROR):
        response = http.get("/v1/probe/crash")
    assert_openai_error(response, 500)
    assert "Traceback" not in response.text
    assert "secret internal detail" not in response.text
    assert response.headers["x-request-id"] in response.json()["error"]["message"]
    assert any(record.exc_info for record in caplog.records)  # the traceback went to the log


def test_node_down_is_503_with_retry_after(http, node_server):
    node_server.close()
    response = http.get("/api/admin/models")
    assert "node" in assert_openai_error(response, 503)["message"]
    assert response.headers["retry-after"] == "5"


# --- rate limits --------------------------------------------------------------------


@pytest.mark.parametrize("control_overrides", [{"api.rate_limit_rpm": 3, "api.rate_limit_admin_rpm": 0}])
def test_rate_limit_per_client(control_app, http):
    statuses = [http.get("/v1/models").status_code for _ in range(3)]
    assert 429 not in statuses
    limited = http.get("/v1/models")
    assert assert_openai_error(limited, 429)["type"] == "rate_limit_exceeded"
    assert int(limited.headers["retry-after"]) >= 1
    assert_anthropic_error(http.post("/v1/messages", json={}), 429, "rate_limit_error")
    # Health, metrics and admin (its own limit, off here) are not counted against /v1.
    assert http.get("/health").status_code == 200
    assert http.get("/metrics").status_code == 200
    assert http.get("/api/admin/config").status_code == 200
    # Another address has its own bucket.
    with client_for(control_app, remote_addr="10.0.0.9", headers=dict(http.headers)) as other:
        assert other.get("/v1/models").status_code != 429


@pytest.mark.parametrize("control_overrides", [{"api.rate_limit_rpm": 0, "api.rate_limit_admin_rpm": 2}])
def test_admin_rate_limit(http):
    assert [http.get("/api/admin/config").status_code for _ in range(2)] == [200, 200]
    assert_openai_error(http.get("/api/admin/config"), 429)


# --- admin --------------------------------------------------------------------------


def test_admin_config_get(http):
    body = http.get("/api/admin/config").json()
    assert body["config"]["node"]["listen_port"] == 8800
    assert any(key["key"] == "api.rate_limit_rpm" for key in body["keys"])
    assert body["restart_needed"] == []


def test_admin_config_put_persists_and_applies(control_app, http, tmp_path):
    response = http.put(
        "/api/admin/config", json={"api": {"rate_limit_rpm": 30}, "node": {"listen_port": 9100}}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["config"]["api"]["rate_limit_rpm"] == 30
    assert body["restart_needed"] == ["node.listen_port"]
    assert load_config(tmp_path, {}).api.rate_limit_rpm == 30
    assert http.get("/api/admin/config").json()["config"]["api"]["rate_limit_rpm"] == 30
    # The new port is now the dashboard's origin for CORS.
    cors = http.get("/health", headers={"Origin": "http://127.0.0.1:9100"})
    assert cors.headers["access-control-allow-origin"] == "http://127.0.0.1:9100"


def test_admin_config_put_unknown_key_changes_nothing(http, tmp_path):
    (tmp_path / "config.yaml").write_text("api:\n  rate_limit_rpm: 5\n", encoding="utf-8")
    before = (tmp_path / "config.yaml").read_bytes()
    response = http.put("/api/admin/config", json={"api": {"rate_limit_rpm": 7, "turbo": True}})
    assert "api.turbo" in assert_openai_error(response, 400)["message"]
    bad_value = http.put("/api/admin/config", json={"api": {"workers": "many"}})
    assert "api.workers" in assert_openai_error(bad_value, 400)["message"]
    assert (tmp_path / "config.yaml").read_bytes() == before


def test_admin_config_reload(control_app, http, tmp_path):
    handled = []
    previous = signal.signal(signal.SIGHUP, lambda *_: handled.append(True))
    control_app.config["SUPERVISOR_PID"] = str(os.getpid())
    try:
        (tmp_path / "config.yaml").write_text(
            yaml.safe_dump({"api": {"rate_limit_rpm": 42}}), encoding="utf-8"
        )
        response = http.post("/api/admin/config/reload")
        assert response.status_code == 200, response.text
        assert response.json()["reloaded"] is True
        assert http.get("/api/admin/config").json()["config"]["api"]["rate_limit_rpm"] == 42
        assert handled == [True]

        (tmp_path / "config.yaml").write_text("api:\n  rate_limit_rpm: -3\n", encoding="utf-8")
        bad = http.post("/api/admin/config/reload")
        assert "api.rate_limit_rpm" in assert_openai_error(bad, 400)["message"]
        assert http.get("/api/admin/config").json()["config"]["api"]["rate_limit_rpm"] == 42
        assert handled == [True]
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_admin_stats_and_models(http, node_server):
    stats = http.get("/api/admin/stats").json()
    assert stats["node"]["state"] == "ready"
    assert stats["config"] == {"model": "smollm2-135m", "port": 8800, "workers": 1}
    models = http.get("/api/admin/models").json()["models"]
    assert [(model["id"], model["state"]) for model in models] == [("mock-1", "ready")]
    node_server.close()
    assert http.get("/api/admin/stats").json()["node"]["state"] == "down"


# --- metrics ------------------------------------------------------------------------


def test_metrics_scrape(control_app, http):
    http.get("/api/admin/config")
    with client_for(control_app) as anonymous:
        response = anonymous.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'swarm_http_requests_total{route="admin.get_config",status="2xx"}' in response.text
    assert 'swarm_node_requests{state="active"}' in response.text


# --- boundaries and the real server -------------------------------------------------


def test_control_app_does_not_import_jax():
    code = "import sys, control.app; sys.exit('jax' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr or "control.app imported jax"


@contextlib.contextmanager
def gunicorn_serving(data_dir: Path, backend: MockBackend, **environment: str) -> Iterator[httpx2.Client]:
    """The real thing: a mock node on a socket in `data_dir` and gunicorn + gevent on a free
    loopback port; yields a client with the API key set. Always stops both."""
    server = NodeServer(data_dir / SOCKET_NAME, backend, max_active=8, max_waiting=256)
    server.serve_in_thread()
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SWARM_", "PROMETHEUS_"))}
    env.update(SWARM_NODE_DATA_DIR=str(data_dir), SWARM_INTERNAL_BIND=f"127.0.0.1:{port}", **environment)
    log_path = data_dir / "gunicorn.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "control/gunicorn_conf.py", "control.wsgi:app"],
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx2.TransportError):
                    if client.get("/health").status_code == 200:
                        break
                assert process.poll() is None, log_path.read_text(errors="replace")
                assert time.monotonic() < deadline, log_path.read_text(errors="replace")
                time.sleep(0.1)
            key = (data_dir / "api_key").read_text(encoding="utf-8").strip()
            client.headers["Authorization"] = f"Bearer {key}"
            yield client
        process.terminate()
        assert process.wait(timeout=35) == 0, log_path.read_text(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        server.close()


@pytest.mark.integration
def test_gunicorn_serves_the_app(tmp_path):
    with gunicorn_serving(tmp_path, MockBackend(), SWARM_API_MAX_BODY_MB="0.01") as client:
        assert client.get("/health/ready").status_code == 200
        models = client.get("/v1/models")
        assert models.status_code == 200, models.text
        assert models.headers["x-request-id"].startswith("req_")
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        # A chunked body (no Content-Length) past api.max_body_mb is stopped too.
        chunked = client.put("/api/admin/config", content=(b" " * 4096 for _ in range(8)))
        assert chunked.status_code == 413, chunked.text
        # One that ends exactly at the limit is served.
        exact = b'{"api": {"rate_limit_rpm": 9}}'.ljust(int(0.01 * 2**20))
        at_limit = client.put("/api/admin/config", content=iter([exact]))
        assert at_limit.status_code == 200, at_limit.text
    log_text = (tmp_path / "gunicorn.log").read_text(errors="replace")
    assert f"[{models.headers['x-request-id']}] control.access: GET /v1/models 200" in log_text


@pytest.mark.integration
def test_health_stays_fast_while_fifty_streams_run(tmp_path):
    body = {
        "model": "mock-1",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 5,
    }
    with gunicorn_serving(tmp_path, MockBackend(delay_s=0.01)) as client:
        endings: list[str] = []

        def stream() -> None:
            with client.stream("POST", "/v1/chat/completions", json=body, timeout=60) as response:
                lines = [line for line in response.iter_lines() if line]
            endings.append(lines[-1] if response.status_code == 200 else str(response.status_code))

        threads = [threading.Thread(target=stream) for _ in range(50)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            assert client.get("/health").status_code == 200
            timings.append(time.perf_counter() - started)
        still_streaming = sum(thread.is_alive() for thread in threads)
        for thread in threads:
            thread.join(timeout=60)
    assert still_streaming > 0  # the probes really ran beside open streams
    assert sorted(timings)[len(timings) // 2] < 0.1, timings  # the median: a shared machine jitters
    assert endings == ["data: [DONE]"] * 50


@pytest.mark.integration
def test_metrics_add_up_across_gunicorn_workers(tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    body = {"model": "mock-1", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 4}
    with gunicorn_serving(
        tmp_path, MockBackend(), SWARM_INTERNAL_WORKERS="3", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)
    ) as client:
        for _ in range(24):
            # A new connection each time, so the requests spread over the workers.
            reply = client.post("/v1/chat/completions", json=body, headers={"Connection": "close"})
            assert reply.status_code == 200, reply.text
        text = client.get("/metrics").text

    def total(name: str, **labels: str) -> float:
        found = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                found += float(line.rsplit(" ", 1)[1])
        return found

    assert total("swarm_generation_tokens_total") == 24 * 4
    # The node's own figures, once per scrape whatever the number of workers.
    assert total("swarm_batch_slots", model="mock-1") == 4
    assert total("swarm_batch_steps_total", model="mock-1") == 24
    assert total("swarm_prefix_cache_reused_tokens_total", model="mock-1") == 128
    assert total("swarm_prompt_tokens_total") == 24 * 3
    assert total("swarm_http_requests_total", status="2xx") >= 24


@pytest.mark.integration
def test_a_client_that_stops_reading_blocks_no_one_and_cancels_on_hang_up(tmp_path):
    backend = MockBackend(delay_s=0.001)  # 100000 tokens would take 100 s
    with gunicorn_serving(tmp_path, backend) as client:
        port = int(str(client.base_url).rsplit(":", 1)[1].strip("/"))
        key = client.headers["Authorization"]
        body = json.dumps(
            {
                "model": "mock-1",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "max_tokens": 100000,
            }
        ).encode()
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Authorization: {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(1.0)  # it streams into full socket buffers and then waits on us
        short = {"model": "mock-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        for _ in range(5):
            reply = client.post("/v1/chat/completions", json=short, timeout=10)
            assert (
                reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "w0 w1 w2 "
            )
        stalled.close()
        deadline = time.monotonic() + 15
        while backend.cancelled_runs == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert backend.cancelled_runs == 1
