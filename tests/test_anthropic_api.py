"""The Anthropic Messages dialect against the mock node, via the `anthropic` SDK and raw HTTP.

The mock model answers "w0 w1 w2 ..." one word per token and counts one prompt
token per word of the joined messages (tests/mock_backend.py). Raw requests pin
what Claude Code and the SDK rely on (api-wire-formats.md §3.2-3.3): an `event:`
line on every event, sequential block indices, `tool_use` stop reasons, the
"prompt is too long" phrase, and errors mid-stream.
"""

from __future__ import annotations

import json
import time

import anthropic
import httpx2
import pydantic
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.anthropic_api import _frames, message_events

STREAM_EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)
USER = [{"role": "user", "content": "say some words"}]  # 3 prompt tokens
TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        "cache_control": {"type": "ephemeral"},
    },
    {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
]


@pytest.fixture
def client(control_app, api_key):
    transport = httpx2.WSGITransport(app=control_app, remote_addr="127.0.0.1")
    with httpx2.Client(transport=transport, base_url="http://127.0.0.1") as http_client:
        yield anthropic.Anthropic(
            base_url="http://127.0.0.1", api_key=api_key, http_client=http_client, max_retries=0
        )


def stream_events(http, body: dict, path: str = "/v1/messages") -> list[dict]:
    """The events of a streamed reply, each checked: `event:` line = data type, SDK-valid."""
    response = http.post(path, json={"stream": True, **body})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("\n\n")
    events = []
    for raw in response.text[:-2].split("\n\n"):
        name_line, data_line = raw.split("\n")
        name = name_line.removeprefix("event: ")
        event = json.loads(data_line.removeprefix("data: "))
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        assert event["type"] == name
        if name not in ("ping", "error"):  # not in the SDK's union; its stream skips ping
            STREAM_EVENT.validate_python(event)
        events.append(event)
    return events


def check_block_order(events: list[dict]) -> None:
    """Blocks strictly sequential from 0: start(i), deltas(i), stop(i), then i+1."""
    open_index, next_index = None, 0
    for event in events:
        if event["type"] == "content_block_start":
            assert open_index is None and event["index"] == next_index
            open_index = event["index"]
        elif event["type"] == "content_block_delta":
            assert event["index"] == open_index
        elif event["type"] == "content_block_stop":
            assert event["index"] == open_index
            open_index, next_index = None, next_index + 1
    assert open_index is None


def test_message_counts_words(client):
    message = client.messages.create(model="claude-opus-5-5", max_tokens=3, messages=USER)
    Message.model_validate(message.model_dump())
    assert message.id.startswith("msg_")
    assert message.role == "assistant"
    assert message.model == "mock-1"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "w0 w1 w2 "
    assert message.stop_reason == "max_tokens"
    assert message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == (3, 3)
    assert message.usage.cache_read_input_tokens == 0


def test_prompt_tokens_from_the_prefix_cache_count_as_cache_reads(http, client):
    """As Anthropic counts: input_tokens are the prompt tokens computed, the rest are
    cache_read_input_tokens, and the three input fields add up to the whole prompt."""
    cached = [{"role": "user", "content": "a b c d e f cached=4"}]
    message = client.messages.create(model="mock-1", max_tokens=2, messages=cached)
    usage = message.usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (3, 4, 0)
    events = stream_events(http, {"model": "mock-1", "max_tokens": 2, "messages": cached})
    for usage in (events[0]["message"]["usage"], events[-2]["usage"]):
        assert (usage["input_tokens"], usage["cache_read_input_tokens"]) == (3, 4)
    assert events[-2]["usage"]["output_tokens"] == 2


def test_stop_reasons(client):
    ended = client.messages.create(
        model="mock-1", max_tokens=9, messages=[{"role": "user", "content": "go stop_after=1"}]
    )
    assert (ended.stop_reason, ended.content[0].text) == ("end_turn", "w0 ")
    stopped = client.messages.create(model="mock-1", max_tokens=9, messages=USER, stop_sequences=["w1"])
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "w1")
    assert stopped.content[0].text == "w0 "


def test_stream_event_sequence(http, client):
    events = stream_events(http, {"model": "claude-x", "max_tokens": 2, "messages": USER})
    types = [event["type"] for event in events]
    assert types == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    check_block_order(events)
    assert events[0]["message"]["usage"]["input_tokens"] == 3
    assert events[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert events[-2]["usage"]["output_tokens"] == 2

    with client.messages.stream(model="claude-x", max_tokens=2, messages=USER) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "w0 w1 "
    assert final.content[0].text == "w0 w1 "
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 2)


def test_empty_reply_still_has_one_text_block(http):
    events = stream_events(
        http, {"model": "mock-1", "max_tokens": 5, "messages": [{"role": "user", "content": "stop_after=0"}]}
    )
    check_block_order(events)
    blocks = [event["content_block"] for event in events if event["type"] == "content_block_start"]
    assert blocks == [{"type": "text", "text": ""}]


@pytest.mark.parametrize(
    ("tool_choice", "name"),
    [({"type": "tool", "name": "get_time"}, "get_time"), ({"type": "any"}, "get_weather")],
)
def test_forced_tool_use(client, tool_choice, name):
    message = client.messages.create(
        model="mock-1", max_tokens=50, messages=USER, tools=TOOLS, tool_choice=tool_choice
    )
    assert message.stop_reason == "tool_use"
    [block] = message.content
    assert block.type == "tool_use"
    assert block.id.startswith("toolu_")
    assert (block.name, block.input) == (name, {"step": 1})


def test_tool_use_stream(http, client):
    body = {"model": "mock-1", "max_tokens": 50, "messages": USER, "tools": TOOLS}
    events = stream_events(http, {**body, "tool_choice": {"type": "tool", "name": "get_weather"}})
    check_block_order(events)
    starts = [event["content_block"] for event in events if event["type"] == "content_block_start"]
    assert [block["type"] for block in starts] == ["tool_use"]  # no empty text block before it
    assert starts[0]["input"] == {} and starts[0]["name"] == "get_weather"
    pieces = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"]
    assert json.loads("".join(pieces)) == {"step": 1}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"

    with client.messages.stream(**body, tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[0].input == {"step": 1}


def test_tool_result_round_trip(client):
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "anything"},
                {"type": "text", "text": "let me look"},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": "sunny and warm",
                    "is_error": True,
                    "cache_control": {"type": "ephemeral"},
                },
                {"type": "text", "text": "thanks"},
            ],
        },
    ]
    message = client.messages.create(model="mock-1", max_tokens=1, messages=messages, tools=TOOLS)
    assert message.content[0].text == "w0 "
    # weather?(1) + "let me look"(3) + "Error: sunny and warm"(4) + thanks(1)
    assert message.usage.input_tokens == 9


def test_tool_result_with_blocks(client):
    messages = [
        {"role": "user", "content": "list"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [{"type": "text", "text": "noon today"}],
                }
            ],
        },
    ]
    message = client.messages.create(model="mock-1", max_tokens=1, messages=messages)
    assert message.usage.input_tokens == 3


def test_claude_code_request_shape_is_accepted(http):
    body = {
        "model": "claude-opus-5-5",
        "max_tokens": 4,
        "system": [
            {"type": "text", "text": "you are helpful"},
            {"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": USER,
        "tools": TOOLS,
        "thinking": {"type": "adaptive", "display": "omitted"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "medium"},
        "metadata": {"user_id": json.dumps({"session": "abc"})},
        "temperature": 1,
    }
    headers = {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,made-up-2099-01-01",
    }
    events = stream_events(http, body, path="/v1/messages?beta=true")
    assert events[0]["message"]["usage"]["input_tokens"] == 8  # 5 system words + 3
    response = http.post("/v1/messages?beta=true", json=body, headers=headers)
    assert response.status_code == 200
    assert Message.model_validate(response.json()).stop_reason == "max_tokens"


def test_system_messages_inside_messages_join_the_system_prompt(http):
    # Claude Code 2.1.330 sends per-turn instructions as {"role": "system"} after the user turn.
    body = {
        "model": "claude-opus-5-5",
        "max_tokens": 4,
        "system": "one two",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "three four"}]},
            {"role": "system", "content": [{"type": "text", "text": "five six seven"}]},
        ],
    }
    response = http.post("/v1/messages?beta=true", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["input_tokens"] == 7
    body["messages"][1] = {"role": "narrator", "content": "x"}
    assert "'messages[1].role'" in error_of(
        http.post("/v1/messages", json=body), 400, "invalid_request_error"
    )


def test_x_api_key_and_old_version_header(control_app, api_key):
    transport = httpx2.WSGITransport(app=control_app, remote_addr="127.0.0.1")
    with httpx2.Client(transport=transport, base_url="http://127.0.0.1") as raw:
        response = raw.post(
            "/v1/messages",
            json={"model": "mock-1", "max_tokens": 1, "messages": USER},
            headers={"x-api-key": api_key, "anthropic-version": "2023-06-01"},
        )
    assert response.status_code == 200


def test_count_tokens(client, http):
    counted = client.messages.count_tokens(model="mock-1", messages=USER, system="one two")
    assert counted.input_tokens == 5
    response = http.post("/v1/messages/count_tokens?beta=true", json={"model": "claude-x", "messages": USER})
    assert response.json() == {"input_tokens": 3}


def error_of(response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == kind
    return body["error"]["message"]


def test_unknown_model_is_404(http, client):
    error_of(
        http.post("/v1/messages", json={"model": "gpt-9", "max_tokens": 1, "messages": USER}),
        404,
        "not_found_error",
    )
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="gpt-9", max_tokens=1, messages=USER)


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": "lots"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": None}, "messages"),
        ({"messages": [{"role": "narrator", "content": "x"}]}, "role"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
        ({"temperature": 1.5}, "temperature"),
        ({"stop_sequences": "w1"}, None),
        ({"tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice"),
        ({"tools": [{"name": "bad name!", "input_schema": {}}]}, "tool"),
    ],
)
def test_bad_fields_are_400(http, change, word):
    body = {"model": "mock-1", "max_tokens": 5, "messages": USER, **change}
    response = http.post("/v1/messages", json=body)
    if word is None:  # lenient: a lone stop string is accepted like OpenAI's
        assert response.status_code == 200
        return
    assert word in error_of(response, 400, "invalid_request_error")


def test_images_are_refused(client):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError, match="images are not supported"):
        client.messages.create(
            model="mock-1",
            max_tokens=1,
            messages=[{"role": "user", "content": [image, {"type": "text", "text": "x"}]}],
        )


def test_context_overflow_uses_claude_codes_phrase(http, client):
    long = [{"role": "user", "content": "word " * 5000}]
    message = error_of(
        http.post("/v1/messages", json={"model": "mock-1", "max_tokens": 5, "messages": long}),
        400,
        "invalid_request_error",
    )
    assert message == "prompt is too long: 5000 tokens > 4096 maximum"
    with pytest.raises(anthropic.BadRequestError, match="prompt is too long"):
        client.messages.count_tokens(model="mock-1", messages=long)


def test_node_down_is_503(http, node_server):
    node_server.close()
    response = http.post("/v1/messages", json={"model": "mock-1", "max_tokens": 5, "messages": USER})
    error_of(response, 503, "overloaded_error")
    assert int(response.headers["Retry-After"]) >= 1


def test_client_disconnect_cancels_the_generation(control_app, api_key, mock_backend):
    mock_backend.delay_s = 0.02
    response = control_app.test_client().post(
        "/v1/messages",
        json={"model": "mock-1", "messages": USER, "max_tokens": 1000, "stream": True},
        headers={"x-api-key": api_key},
        buffered=False,
    )
    frames = iter(response.response)
    assert next(frames).startswith(b"event: message_start")
    next(frames)
    response.close()
    deadline = time.monotonic() + 5
    while mock_backend.cancelled_runs < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mock_backend.cancelled_runs == 1


def test_error_midstream_is_an_error_event_and_no_message_stop():
    events = [
        {"event": "start", "model": "m", "prompt_tokens": 2},
        {"event": "text", "text": "w0 ", "token_id": 0},
        {"event": "keepalive"},
        {"event": "error", "code": "overloaded", "message": "the node's queue is full"},
    ]
    frames = list(_frames(message_events(iter(events), "msg_1")))
    assert frames.count('event: ping\ndata: {"type":"ping"}\n\n') == 2
    assert not any(frame.startswith("event: message_stop") for frame in frames)
    assert frames[-1].startswith("event: error\n")
    error = json.loads(frames[-1].split("\n")[1].removeprefix("data: "))
    assert error == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "the node's queue is full"},
    }


def test_text_after_a_tool_call_opens_a_new_block():
    events = [
        {"event": "start", "model": "m", "prompt_tokens": 2},
        {"event": "text", "text": "first ", "token_id": 0},
        {"event": "tool_call", "index": 0, "id": "call_abc", "name": "get_time"},
        {"event": "arguments", "index": 0, "delta": "{}"},
        {"event": "text", "text": "after", "token_id": 1},
        {
            "event": "done",
            "finish_reason": "stop",
            "stop_sequence": None,
            "prompt_tokens": 2,
            "completion_tokens": 3,
        },
    ]
    out = list(message_events(iter(events), "msg_1"))
    check_block_order(out)
    starts = [event["content_block"]["type"] for event in out if event["type"] == "content_block_start"]
    assert starts == ["text", "tool_use", "text"]
    assert out[-2]["delta"]["stop_reason"] == "tool_use"  # a tool_use block went out


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-50, 50)
    | st.floats()
    | st.text(max_size=4)
    | st.sampled_from(
        ["text", "image", "tool_use", "tool_result", "auto", "any", "tool", "user", "assistant"]
    ),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                ["type", "text", "name", "id", "input", "content", "role", "tool_use_id", "is_error"]
            ),
            children,
            max_size=3,
        )
    ),
    max_leaves=10,
)
FIELDS = ["model", "messages", "max_tokens", "system", "temperature", "top_p", "top_k", "stop_sequences"]
FIELDS += ["stream", "tools", "tool_choice", "thinking"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"]),
    changes=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=3),
    content=JSON_VALUES,
)
def test_no_body_gets_a_server_error(http, path, changes, content):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]
    body = {"model": "mock-1", "max_tokens": 2, "messages": messages, **changes}
    response = http.post(path, content=json.dumps(body))
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert response.json()["type"] == "error"
