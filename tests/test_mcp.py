"""MCP at /mcp against the mock node: raw JSON-RPC over the in-process app, and the
official `mcp` client (legacy, auto and 2026-07-28 modes) against a real loopback server.

The mock model answers "w0 w1 w2 ..." one word per token, so every generated text
here is checkable by hand (tests/mock_backend.py).
"""

from __future__ import annotations

import asyncio
import base64
import re
import threading

import httpx2
import jsonschema
import mcp_types
import pytest
from werkzeug.serving import make_server

import swarm

MODERN = "2026-07-28"
TOOL_NAMES = ["chat", "models", "compare", "research", "batch_prompts", "delegate", "node_info"]
VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
CAPABILITIES_KEY = "io.modelcontextprotocol/clientCapabilities"
MODERN_META = {VERSION_KEY: MODERN, CAPABILITIES_KEY: {}}
CAPABILITIES = {
    "tools": {"listChanged": False},
    "prompts": {"listChanged": False},
    "resources": {"listChanged": False},
}


@pytest.fixture
def control_overrides() -> dict:
    return {
        "api.rate_limit_rpm": 0,
        "api.rate_limit_admin_rpm": 0,
        "api.cors_origins": ["https://app.example"],
    }


def rpc(http, method, params=None, *, request_id=1, headers=None):
    message = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return http.post("/mcp", json=message, headers=headers or {})


def call(http, name, arguments, **options):
    response = rpc(http, "tools/call", {"name": name, "arguments": arguments}, **options)
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    mcp_types.CallToolResult.model_validate(result)
    return result


def initialize(http, version="2025-11-25"):
    params = {
        "protocolVersion": version,
        "capabilities": {},
        "clientInfo": {"name": "pytest", "version": "1"},
    }
    return rpc(http, "initialize", params)


# --- handshake era ----------------------------------------------------------------------


def test_initialize_negotiates_and_assigns_a_visible_ascii_session(http):
    response = initialize(http, "2025-06-18")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    result = mcp_types.InitializeResult.model_validate(response.json()["result"])
    assert result.protocol_version == "2025-06-18"
    assert result.server_info.name == "swarm" and result.server_info.version == swarm.__version__
    assert response.json()["result"]["capabilities"] == CAPABILITIES
    assert re.fullmatch(r"[\x21-\x7e]+", response.headers["Mcp-Session-Id"])
    # An unknown version gets our latest handshake version; the client decides.
    assert initialize(http, "1999-01-01").json()["result"]["protocolVersion"] == "2025-11-25"


def test_notifications_are_accepted_with_202_and_no_body(http):
    response = http.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert response.status_code == 202 and response.content == b""


def test_tools_list_has_the_seven_tools_with_valid_schemas(http):
    result = rpc(http, "tools/list").json()["result"]
    mcp_types.ListToolsResult.model_validate(result)
    assert [tool["name"] for tool in result["tools"]] == TOOL_NAMES
    for tool in result["tools"]:
        assert re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", tool["name"])
        assert tool["title"] and tool["description"]
        schema = tool["inputSchema"]
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["type"] == "object" and schema["additionalProperties"] is False
        assert set(schema["required"]) <= set(schema["properties"])
        annotations = tool["annotations"]
        assert annotations["destructiveHint"] is False and annotations["openWorldHint"] is False


def test_chat_replies_with_the_models_text(http):
    arguments = {"model": "mock-1", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
    result = call(http, "chat", arguments)
    assert result["isError"] is False
    assert result["content"] == [{"type": "text", "text": "w0 w1 w2 "}]
    structured = result["structuredContent"]
    assert structured["model"] == "mock-1" and structured["finish_reason"] == "length"
    assert structured["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 3,
        "total_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_tool_defaults_apply(http):
    result = call(http, "chat", {"model": "default", "messages": [{"role": "user", "content": "hi"}]})
    assert result["structuredContent"]["usage"]["completion_tokens"] == 1024


def test_models_and_node_info_describe_the_node(http):
    models = call(http, "models", {})
    assert "mock-1" in models["content"][0]["text"]
    assert models["structuredContent"]["models"][0]["context_length"] == 4096
    info = call(http, "node_info", {})["structuredContent"]
    assert info["state"] == "ready" and info["version"] == swarm.__version__
    assert info["models"][0]["id"] == "mock-1" and info["uptime_s"] >= 0
    assert info["queue"] == {"active": 0, "waiting": 0}


def test_compare_reports_each_model_and_an_unknown_model_is_not_a_tool_failure(http):
    result = call(http, "compare", {"prompt": "say", "models": ["mock-1", "nope"], "max_tokens": 2})
    assert result["isError"] is False
    ok, missing = result["structuredContent"]["results"]
    assert ok["status"] == "ok" and ok["content"] == "w0 w1 "
    assert missing["status"] == "error" and "not served" in missing["error"]
    assert "w0 w1" in result["content"][0]["text"] and "nope" in result["content"][0]["text"]


def test_research_asks_every_served_model_then_synthesises(http):
    result = call(http, "research", {"question": "why?", "max_tokens": 2})
    structured = result["structuredContent"]
    assert [answer["model"] for answer in structured["answers"]] == ["mock-1"]
    assert structured["answers"][0]["content"] == "w0 w1 "
    assert structured["synthesis"]["status"] == "ok" and structured["synthesis"]["content"] == "w0 w1 "
    # The synthesis prompt carries the question and the first answer.
    assert (
        structured["synthesis"]["usage"]["prompt_tokens"] > structured["answers"][0]["usage"]["prompt_tokens"]
    )
    assert "Synthesis by mock-1" in result["content"][0]["text"]


def test_batch_prompts_keys_results_by_task_id(http):
    tasks = [
        {"id": "a", "model": "mock-1", "prompt": "one", "max_tokens": 1},
        {"id": "b", "model": "mock-1", "prompt": "two", "max_tokens": 2, "system": "be brief"},
        {"id": "c", "model": "elsewhere", "prompt": "three"},
    ]
    structured = call(http, "batch_prompts", {"tasks": tasks})["structuredContent"]
    results = structured["results"]
    assert results["a"]["content"] == "w0 " and results["b"]["content"] == "w0 w1 "
    assert results["b"]["usage"]["prompt_tokens"] == 3  # the system prompt reached the model
    assert results["c"]["status"] == "error"
    assert (structured["succeeded"], structured["failed"]) == (2, 1)


@pytest.mark.parametrize("tier", ["fast", "cheap", "smart"])
def test_delegate_picks_a_served_model_for_the_tier(http, tier):
    result = call(http, "delegate", {"prompt": "do it", "tier": tier, "max_tokens": 2})
    structured = result["structuredContent"]
    assert structured["model"] == "mock-1" and structured["tier"] == tier
    assert structured["content"] == "w0 w1 " and "mock-1" in result["content"][0]["text"]


@pytest.mark.parametrize(
    ("name", "arguments", "message"),
    [
        ("chat", {"messages": [{"role": "user", "content": "x"}]}, "arguments.model is required"),
        ("chat", {"model": "mock-1", "messages": "hi"}, "arguments.messages must be a list of objects"),
        (
            "chat",
            {"model": "mock-1", "messages": [{"role": "tool", "content": "x"}]},
            "arguments.messages[0].role",
        ),
        (
            "chat",
            {"model": "mock-1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000},
            "arguments.max_tokens must be between 1 and 4096",
        ),
        (
            "chat",
            {"model": "mock-1", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            "arguments.temperature must be a number",
        ),
        ("chat", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, "not served"),
        ("compare", {"prompt": "x", "models": "mock-1"}, "arguments.models must be a list of strings"),
        ("compare", {"prompt": "x", "models": []}, "arguments.models must have between 1 and 10 items"),
        ("compare", {"models": ["mock-1"]}, "arguments.prompt is required"),
        ("delegate", {"prompt": "x", "tier": "huge"}, "arguments.tier must be one of fast, cheap, smart"),
        (
            "batch_prompts",
            {"tasks": [{"id": "a", "model": "mock-1"}]},
            "arguments.tasks[0].prompt is required",
        ),
        ("batch_prompts", {"tasks": [{"id": "a", "model": "m", "prompt": "p"}] * 2}, "ids must be unique"),
        ("node_info", {"verbose": True}, "arguments.verbose is not a known argument"),
    ],
)
def test_bad_arguments_are_tool_errors_the_model_can_read(http, name, arguments, message):
    result = call(http, name, arguments)
    assert result["isError"] is True
    assert message in result["content"][0]["text"]


def test_a_node_that_is_down_is_a_tool_error(http, node_server):
    node_server.close()
    result = call(http, "node_info", {})
    assert result["isError"] is True
    assert result["content"][0]["text"] == "the node is not reachable (starting or down)"


def test_unknown_tool_and_method_are_json_rpc_errors(http):
    unknown_tool = rpc(http, "tools/call", {"name": "rm_rf", "arguments": {}}).json()
    assert unknown_tool["error"]["code"] == -32602 and unknown_tool["id"] == 1
    unknown_method = rpc(http, "sampling/createMessage", request_id="abc").json()
    mcp_types.JSONRPCError.model_validate(unknown_method)
    assert unknown_method["error"]["code"] == -32601 and unknown_method["id"] == "abc"
    assert rpc(http, "ping").json()["result"] == {}


def test_malformed_messages_are_rejected_with_400(http):
    batch = http.post("/mcp", json=[{"jsonrpc": "2.0", "id": 1, "method": "ping"}])
    assert batch.status_code == 400 and batch.json()["error"]["code"] == -32600
    assert "batches" in batch.json()["error"]["message"]
    garbage = http.post("/mcp", content=b"{not json", headers={"Content-Type": "application/json"})
    assert garbage.status_code == 400 and garbage.json()["error"]["code"] == -32700
    no_version = http.post("/mcp", json={"id": 1, "method": "ping"})
    assert no_version.status_code == 400 and no_version.json()["error"]["code"] == -32600


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        ("http://evil.example", 403),
        ("http://127.0.0.1.evil.example:8800", 403),
        ("null", 403),
        ("http://localhost:5173", 200),
        ("http://127.0.0.1", 200),
        ("http://[::1]:8800", 200),
        ("https://app.example", 200),  # configured in api.cors_origins
    ],
)
def test_origin_is_checked_against_dns_rebinding(http, origin, status):
    assert rpc(http, "ping", headers={"Origin": origin}).status_code == status


def test_get_is_not_offered(http):
    response = http.get("/mcp")
    assert response.status_code == 405 and "POST" in response.headers["Allow"]


def test_session_lifecycle(http):
    session = initialize(http).headers["Mcp-Session-Id"]
    headers = {"Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
    assert rpc(http, "tools/list", headers=headers).status_code == 200
    assert rpc(http, "tools/list").status_code == 200  # no session at all: a curl user, served
    forged = {"Mcp-Session-Id": session[:-2] + "xx"}
    assert rpc(http, "tools/list", headers=forged).status_code == 404
    assert http.delete("/mcp").status_code == 400
    assert http.delete("/mcp", headers=headers).status_code in (200, 204)
    assert rpc(http, "tools/list", headers=headers).status_code == 404
    assert http.delete("/mcp", headers=headers).status_code == 404


def test_sessions_hold_across_workers(http, control_app, tmp_path):
    """gunicorn runs several workers: any of them accepts a session, and ending it
    in one ends it in all."""
    from control.app import create_app

    session = initialize(http).headers["Mcp-Session-Id"]
    other_worker = create_app(control_app.config["SWARM"], tmp_path)
    transport = httpx2.WSGITransport(app=other_worker, remote_addr="127.0.0.1")
    headers = {"Authorization": f"Bearer {control_app.config['API_KEY']}", "Mcp-Session-Id": session}
    with httpx2.Client(transport=transport, base_url="http://127.0.0.1", headers=headers) as other:
        assert rpc(other, "ping").status_code == 200
        assert http.delete("/mcp", headers={"Mcp-Session-Id": session}).status_code in (200, 204)
        assert rpc(other, "ping").status_code == 404


def test_unknown_protocol_version_header_is_400(http):
    response = rpc(http, "tools/list", headers={"MCP-Protocol-Version": "garbage"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32022
    assert "2025-11-25" in response.json()["error"]["data"]["supported"]
    # A known but different handshake version than negotiated is tolerated (Claude Code does this).
    assert rpc(http, "tools/list", headers={"MCP-Protocol-Version": "2024-11-05"}).status_code == 200


# --- modern era (2026-07-28) -------------------------------------------------------------


def modern_headers(method, name=None, version=MODERN):
    headers = {"MCP-Protocol-Version": version, "Mcp-Method": method}
    if name:
        headers["Mcp-Name"] = name
    return headers


def test_server_discover_shape(http):
    params = {"_meta": MODERN_META}
    response = rpc(http, "server/discover", params, headers=modern_headers("server/discover"))
    assert response.status_code == 200
    result = response.json()["result"]
    discovered = mcp_types.DiscoverResult.model_validate(result)
    assert discovered.supported_versions[0] == MODERN and "2025-11-25" in discovered.supported_versions
    assert result["resultType"] == "complete" and result["capabilities"] == CAPABILITIES
    assert (result["ttlMs"], result["cacheScope"]) == (0, "private")
    assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "swarm"


def test_modern_requests_need_no_session(http):
    listing = rpc(http, "tools/list", {"_meta": MODERN_META}, headers=modern_headers("tools/list"))
    result = listing.json()["result"]
    assert "Mcp-Session-Id" not in listing.headers
    assert [tool["name"] for tool in result["tools"]] == TOOL_NAMES
    assert (result["resultType"], result["ttlMs"], result["cacheScope"]) == ("complete", 0, "private")
    params = {
        "name": "chat",
        "arguments": {"model": "mock-1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
        "_meta": MODERN_META,
    }
    answer = rpc(http, "tools/call", params, headers=modern_headers("tools/call", "chat")).json()["result"]
    assert answer["resultType"] == "complete" and answer["content"][0]["text"] == "w0 "
    assert "ttlMs" not in answer


def test_modern_errors_carry_http_statuses(http):
    unknown = rpc(
        http,
        "sampling/createMessage",
        {"_meta": MODERN_META},
        headers=modern_headers("sampling/createMessage"),
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == -32601
    mismatch = rpc(http, "tools/list", {"_meta": MODERN_META}, headers=modern_headers("tools/call"))
    assert mismatch.status_code == 400 and mismatch.json()["error"]["code"] == -32020
    params = {"name": "models", "arguments": {}, "_meta": MODERN_META}
    wrong_name = rpc(http, "tools/call", params, headers=modern_headers("tools/call", "chat"))
    assert wrong_name.status_code == 400 and wrong_name.json()["error"]["code"] == -32020
    future = {"_meta": {**MODERN_META, VERSION_KEY: "2099-01-01"}}
    unsupported = rpc(http, "tools/list", future, headers=modern_headers("tools/list", version="2099-01-01"))
    assert unsupported.status_code == 400 and unsupported.json()["error"]["code"] == -32022
    assert unsupported.json()["error"]["data"] == {
        "supported": [MODERN, "2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"],
        "requested": "2099-01-01",
    }


def modern_error(response, status, code):
    assert response.status_code == status, response.text
    body = response.json()
    mcp_types.JSONRPCError.model_validate(body)
    assert body["id"] == 1 and body["error"]["code"] == code
    return body["error"]


@pytest.mark.parametrize("method", ["server/discover", "tools/list"])
@pytest.mark.parametrize(
    ("meta", "missing"),
    [
        (None, "params._meta must be an object"),
        ({CAPABILITIES_KEY: {}}, "protocolVersion"),
        ({VERSION_KEY: MODERN}, "clientCapabilities"),
    ],
)
def test_modern_requests_without_the_meta_envelope_are_invalid_params(http, method, meta, missing):
    """A request that is modern by its header (or by being server/discover) must carry
    params._meta with the protocol version and client capabilities: 400 and -32602."""
    params = {} if meta is None else {"_meta": meta}
    error = modern_error(rpc(http, method, params, headers=modern_headers(method)), 400, -32602)
    assert missing in error["message"]


def test_server_discover_without_any_envelope_is_refused(http):
    # Even from a client that sends no headers at all: discover only exists in 2026-07-28.
    modern_error(rpc(http, "server/discover"), 400, -32602)


def test_client_info_is_optional(http):
    meta = {**MODERN_META, "io.modelcontextprotocol/clientInfo": {"name": "pytest", "version": "1"}}
    for envelope in (MODERN_META, meta):
        response = rpc(
            http, "server/discover", {"_meta": envelope}, headers=modern_headers("server/discover")
        )
        assert response.status_code == 200 and response.json()["result"]["supportedVersions"][0] == MODERN


def test_a_non_string_protocol_version_is_a_header_mismatch(http):
    params = {"_meta": {**MODERN_META, VERSION_KEY: 20260728}}
    headers = modern_headers("tools/list", version="20260728")
    modern_error(rpc(http, "tools/list", params, headers=headers), 400, -32020)


@pytest.mark.parametrize("header", ["Mcp-Method", "MCP-Protocol-Version"])
def test_a_modern_request_missing_a_routing_header_is_a_header_mismatch(http, header):
    headers = modern_headers("tools/list")
    del headers[header]
    error = modern_error(rpc(http, "tools/list", {"_meta": MODERN_META}, headers=headers), 400, -32020)
    assert header in error["message"]


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("tools/call", {"name": "models", "arguments": {}}),
        ("prompts/get", {"name": "summarise"}),
        ("resources/read", {"uri": "file:///etc/hosts"}),
    ],
)
def test_a_named_request_missing_mcp_name_is_a_header_mismatch(http, method, params):
    response = rpc(http, method, {**params, "_meta": MODERN_META}, headers=modern_headers(method))
    assert "Mcp-Name" in modern_error(response, 400, -32020)["message"]


def test_mcp_name_may_be_padded_or_base64_encoded(http):
    params = {"name": "models", "arguments": {}, "_meta": MODERN_META}
    padded = rpc(http, "tools/call", params, headers=modern_headers("tools/call", "  models\t"))
    assert padded.status_code == 200 and padded.json()["result"]["isError"] is False
    encoded = "=?base64?" + base64.b64encode(b"models").decode() + "?="
    assert rpc(http, "tools/call", params, headers=modern_headers("tools/call", encoded)).status_code == 200
    broken = modern_headers("tools/call", "=?base64?not base64?=")
    modern_error(rpc(http, "tools/call", params, headers=broken), 400, -32020)


def test_method_values_are_case_sensitive_and_headers_may_not_repeat(http):
    params = {"_meta": MODERN_META}
    modern_error(rpc(http, "tools/list", params, headers=modern_headers("TOOLS/LIST")), 400, -32020)
    # A repeated header reaches WSGI folded into one comma-joined value (as gunicorn does).
    repeated = modern_headers("tools/list") | {"Mcp-Method": "tools/list, tools/list"}
    modern_error(rpc(http, "tools/list", params, headers=repeated), 400, -32020)
    # Header names are case-insensitive.
    lower = {"mcp-protocol-version": MODERN, "mcp-method": "tools/list"}
    assert rpc(http, "tools/list", params, headers=lower).status_code == 200


def test_a_header_that_contradicts_the_body_version_is_a_mismatch_before_unsupported(http):
    params = {"_meta": {**MODERN_META, VERSION_KEY: "v999.0.0"}}
    modern_error(rpc(http, "server/discover", params, headers=modern_headers("server/discover")), 400, -32020)
    headers = modern_headers("server/discover", version="v999.0.0")
    error = modern_error(rpc(http, "server/discover", params, headers=headers), 400, -32022)
    assert error["data"]["requested"] == "v999.0.0"
    # A modern body without the version header is a mismatch too, not a curl-style legacy request.
    modern_error(rpc(http, "tools/list", {"_meta": MODERN_META}), 400, -32020)


@pytest.mark.parametrize("method", ["initialize", "ping", "logging/setLevel"])
def test_handshake_methods_are_gone_in_the_modern_era(http, method):
    response = rpc(http, method, {"_meta": MODERN_META}, headers=modern_headers(method))
    modern_error(response, 404, -32601)
    assert "Mcp-Session-Id" not in response.headers


def test_modern_notifications_are_accepted_without_the_envelope(http):
    message = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}
    response = http.post("/mcp", json=message, headers={"MCP-Protocol-Version": MODERN})
    assert response.status_code == 202 and response.content == b""


@pytest.mark.parametrize(("method", "key"), [("prompts/list", "prompts"), ("resources/list", "resources")])
def test_prompts_and_resources_are_declared_and_empty(http, method, key):
    assert rpc(http, method).json()["result"] == {key: []}
    modern = rpc(http, method, {"_meta": MODERN_META}, headers=modern_headers(method)).json()["result"]
    assert modern[key] == [] and (modern["ttlMs"], modern["cacheScope"]) == (0, "private")
    templates = rpc(http, "resources/templates/list").json()["result"]
    mcp_types.ListResourceTemplatesResult.model_validate(templates)


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("prompts/get", {"name": "summarise"}, "prompt not found: 'summarise'"),
        ("resources/read", {"uri": "test://nothing"}, "resource not found: 'test://nothing'"),
    ],
)
def test_unknown_prompts_and_resources_are_invalid_params_in_both_eras(http, method, params, message):
    legacy = rpc(http, method, params)
    assert legacy.status_code == 200
    assert legacy.json()["error"]["message"].startswith(message) and legacy.json()["error"]["data"] == params
    name = next(iter(params.values()))
    modern = rpc(http, method, {**params, "_meta": MODERN_META}, headers=modern_headers(method, name))
    assert modern_error(modern, 400, -32602)["data"] == params
    wrong_type = rpc(http, method, {next(iter(params)): 7}).json()["error"]
    assert wrong_type["code"] == -32602 and "must be a string" in wrong_type["message"]


def test_clients_without_protocol_headers_stay_in_the_lenient_handshake_era(http):
    """curl: no session, no version header, no _meta; served as the handshake era."""
    for method in ("tools/list", "ping", "prompts/list"):
        response = rpc(http, method)
        assert response.status_code == 200 and "resultType" not in response.json()["result"]
    assert rpc(http, "tools/call", {"name": "models", "arguments": {}}).json()["result"]["isError"] is False
    assert rpc(http, "initialize", {"protocolVersion": "2025-11-25"}).status_code == 200


# --- the official client against a real server -------------------------------------------


@pytest.fixture
def server_url(control_app):
    server = make_server("127.0.0.1", 0, control_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/mcp"
    server.shutdown()
    thread.join(timeout=5)


async def _client_session(url: str, key: str, mode: str) -> tuple[str, list[str], dict, str]:
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    headers = {"Authorization": f"Bearer {key}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http_client,
        Client(streamable_http_client(url, http_client=http_client), mode=mode) as client,
    ):
        tools = await client.list_tools()
        info = await client.call_tool("node_info", {})
        chat = await client.call_tool(
            "chat", {"model": "mock-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        )
        assert not info.is_error and not chat.is_error
        return (
            client.protocol_version,
            [t.name for t in tools.tools],
            info.structured_content,
            chat.content[0].text,
        )


@pytest.mark.parametrize(("mode", "version"), [("legacy", "2025-11-25"), ("auto", MODERN), (MODERN, MODERN)])
def test_official_client_end_to_end(server_url, api_key, mode, version):
    negotiated, names, info, reply = asyncio.run(_client_session(server_url, api_key, mode))
    assert negotiated == version
    assert names == TOOL_NAMES
    assert info["state"] == "ready"
    assert reply == "w0 w1 "
