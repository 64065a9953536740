"""Property-based fuzzing of every API route: whatever the body, never a 5xx.

Bodies are valid requests with fields replaced, dropped or added (random JSON of
any type), plus arbitrary JSON and raw bytes. Each answer must be a non-5xx status
with a JSON body; errors must be in the route's dialect.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

VALID = {
    "/v1/chat/completions": {
        "model": "mock-1",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 3,
        "temperature": 0.5,
        "stream": False,
        "stop": ["x"],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
        "logprobs": False,
        "response_format": {"type": "text"},
        "seed": 1,
    },
    "/v1/completions": {"model": "mock-1", "prompt": "hello", "max_tokens": 3, "echo": False, "logprobs": 0},
    "/v1/embeddings": {"model": "mock-1", "input": ["a b", "c"], "encoding_format": "float"},
    "/v1/messages": {
        "model": "claude-x",
        "max_tokens": 3,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "system": "be brief",
        "stop_sequences": ["x"],
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "auto"},
        "temperature": 0.5,
    },
    "/v1/messages/count_tokens": {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}]},
    "/mcp": {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "models", "arguments": {}},
    },
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated(draw, route: str):
    body = json.loads(json.dumps(VALID[route]))
    for _ in range(draw(st.integers(1, 3))):
        target = body
        path = draw(
            st.lists(st.sampled_from(["messages", "tools", "params", 0, "content", "function"]), max_size=2)
        )
        for step in path:
            inner = target.get(step) if isinstance(target, dict) else None
            if isinstance(step, int) and isinstance(target, list) and target:
                inner = target[0]
            if isinstance(inner, (dict, list)):
                target = inner
        if isinstance(target, dict) and target:
            key = draw(st.sampled_from(sorted(target, key=str)))
            action = draw(st.sampled_from(["replace", "drop", "add"]))
            if action == "replace":
                target[key] = draw(json_values)
            elif action == "drop":
                del target[key]
            else:
                target[draw(st.text(max_size=8))] = draw(json_values)
        elif isinstance(target, list) and target:
            target[0] = draw(json_values)
    return body


def check(response, route: str) -> None:
    assert response.status_code < 500, (route, response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        if route.startswith("/v1/messages"):
            assert body["type"] == "error" and body["error"]["type"] and body["error"]["message"]
        elif route == "/mcp":
            assert body["error"]["code"] < 0
        else:
            assert set(body["error"]) >= {"message", "type", "param", "code"}


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("route", sorted(VALID))
def test_valid_bodies_succeed(http, route):
    response = http.post(route, json=VALID[route])
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("route", sorted(VALID))
@FUZZ
@given(data=st.data())
def test_mutated_bodies_never_5xx(http, route, data):
    body = data.draw(mutated(route))
    check(http.post(route, json=body), route)


@pytest.mark.parametrize("route", sorted(VALID))
@FUZZ
@given(body=json_values)
def test_arbitrary_json_never_5xx(http, route, body):
    check(http.post(route, json=body), route)


@pytest.mark.parametrize("route", sorted(VALID))
@FUZZ
@given(raw=st.binary(max_size=64))
def test_raw_bytes_never_5xx(http, route, raw):
    check(http.post(route, content=raw, headers={"content-type": "application/json"}), route)


@FUZZ
# Printable ASCII: the in-process WSGI transport hands PATH_INFO over undecoded
# (PEP 3333 wants latin-1), which real servers such as gunicorn do right.
@given(model=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40))
def test_model_lookup_never_5xx(http, model):
    response = http.get("/v1/models/" + quote(model, safe=""))
    assert response.status_code < 500, response.text
