"""The OpenAI dialect against the mock node, through the official `openai` SDK and raw HTTP.

The mock model answers "w0 w1 w2 ..." one word per token and counts one prompt
token per whitespace-separated word of the joined messages (tests/mock_backend.py),
so every text and usage number below is checked by hand. Raw requests pin what the
SDK hides: SSE framing, `[DONE]`, tool-call fragments, error bodies.
"""

from __future__ import annotations

import base64
import json
import struct
import time

import httpx2
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types import Completion, CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletionChunk

from control.openai_render import Call, chat_frames, errors_in_band
from control.sse import DONE_FRAME, KEEPALIVE_FRAME
from swarm.node_protocol import GenerationRequest
from swarm.sampling import SamplingParams

USER = [{"role": "user", "content": "say some words"}]  # 3 prompt tokens
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]


@pytest.fixture
def client(control_app, api_key):
    transport = httpx2.WSGITransport(app=control_app, remote_addr="127.0.0.1")
    with httpx2.Client(transport=transport, base_url="http://127.0.0.1") as http_client:
        yield openai.OpenAI(
            base_url="http://127.0.0.1/v1", api_key=api_key, http_client=http_client, max_retries=0
        )


def sse_payloads(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, checking every event ends with a blank line."""
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    payloads = []
    for event in events:
        assert event.startswith("data: "), event
        assert "\n" not in event
        payloads.append(event.removeprefix("data: "))
    return payloads


def stream_chunks(http, body: dict) -> list[dict]:
    response = http.post("/v1/chat/completions", json={"stream": True, **body})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    assert len({chunk["id"] for chunk in chunks}) == 1
    return chunks


def test_chat_completion_counts_words(client):
    completion = client.chat.completions.create(
        model="mock-1", messages=[{"role": "system", "content": "be brief"}, *USER], max_tokens=3
    )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "mock-1"
    assert completion.system_fingerprint.startswith("swarm-")
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "w0 w1 w2 "
    assert choice.finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 3)
    assert completion.usage.total_tokens == 8


def test_chat_content_parts_and_developer_role(client):
    completion = client.chat.completions.create(
        model="default",
        messages=[
            {"role": "developer", "content": "one two"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "three"}, {"type": "text", "text": "four five"}],
            },
        ],
        max_tokens=1,
    )
    assert completion.usage.prompt_tokens == 5


def test_chat_stops_where_the_model_stops(client):
    messages = [{"role": "user", "content": "count stop_after=2"}]
    completion = client.chat.completions.create(model="mock-1", messages=messages, max_tokens=10)
    assert completion.choices[0].message.content == "w0 w1 "
    assert completion.choices[0].finish_reason == "stop"


def test_chat_ignore_eos_decodes_to_max_tokens(client):
    messages = [{"role": "user", "content": "count stop_after=2"}]
    completion = client.chat.completions.create(
        model="mock-1", messages=messages, max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert completion.choices[0].message.content == "w0 w1 w2 w3 w4 "
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5


def test_chat_stop_strings(client):
    completion = client.chat.completions.create(model="mock-1", messages=USER, max_tokens=10, stop=["w2"])
    assert completion.choices[0].message.content == "w0 w1 "
    assert completion.choices[0].finish_reason == "stop"


def test_chat_stream_framing(http):
    chunks = stream_chunks(http, {"model": "mock-1", "messages": USER, "max_tokens": 3})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in chunks[0]
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert text == "w0 w1 w2 "
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])


def test_chat_stream_include_usage(http, client):
    body = {"model": "mock-1", "messages": USER, "max_tokens": 2, "stream_options": {"include_usage": True}}
    chunks = stream_chunks(http, body)
    assert all("usage" in chunk and chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    sdk_chunks = list(
        client.chat.completions.create(
            model="mock-1", messages=USER, max_tokens=2, stream=True, stream_options={"include_usage": True}
        )
    )
    assert sdk_chunks[-1].usage.completion_tokens == 2


def test_prompt_tokens_from_the_prefix_cache_are_reported_as_cached(http, client):
    messages = [{"role": "user", "content": "a b c d e f cached=4"}]
    completion = client.chat.completions.create(model="mock-1", messages=messages, max_tokens=2)
    assert completion.usage.prompt_tokens == 7  # every prompt token, cached or not
    assert completion.usage.prompt_tokens_details.cached_tokens == 4
    body = {
        "model": "mock-1",
        "messages": messages,
        "max_tokens": 2,
        "stream_options": {"include_usage": True},
    }
    assert stream_chunks(http, body)[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
    legacy = client.completions.create(model="mock-1", prompt="a b c cached=2", max_tokens=1)
    assert (legacy.usage.prompt_tokens, legacy.usage.prompt_tokens_details.cached_tokens) == (4, 2)


def test_chat_logprobs(client):
    completion = client.chat.completions.create(
        model="mock-1", messages=USER, max_tokens=2, logprobs=True, top_logprobs=2
    )
    content = completion.choices[0].logprobs.content
    assert [entry.token for entry in content] == ["w0 ", "w1 "]
    assert content[0].logprob == -0.5
    assert content[0].bytes == list(b"w0 ")
    assert [(top.token, top.logprob) for top in content[1].top_logprobs] == [("w1", -0.5), ("x1", -1.5)]
    plain = client.chat.completions.create(model="mock-1", messages=USER, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_chat_stream_logprobs(http):
    chunks = stream_chunks(
        http, {"model": "mock-1", "messages": USER, "max_tokens": 2, "logprobs": True, "top_logprobs": 1}
    )
    entries = [c["choices"][0]["logprobs"]["content"][0] for c in chunks if c["choices"][0]["logprobs"]]
    assert [entry["token"] for entry in entries] == ["w0 ", "w1 "]


def test_chat_json_object(client):
    for kind in (
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
    ):
        completion = client.chat.completions.create(model="mock-1", messages=USER, response_format=kind)
        assert json.loads(completion.choices[0].message.content) == {"answer": 42}


@pytest.mark.parametrize(
    ("tool_choice", "name"),
    [("required", "get_weather"), ({"type": "function", "function": {"name": "get_time"}}, "get_time")],
)
def test_chat_forced_tool_call(client, tool_choice, name):
    completion = client.chat.completions.create(
        model="mock-1", messages=USER, tools=TOOLS, tool_choice=tool_choice
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == name
    assert json.loads(call.function.arguments) == {"step": 1}


def test_chat_tool_call_stream_fragments(http, client):
    body = {"model": "mock-1", "messages": USER, "tools": TOOLS, "tool_choice": "required"}
    chunks = stream_chunks(http, body)
    fragments = [
        chunk["choices"][0]["delta"]["tool_calls"]
        for chunk in chunks
        if "tool_calls" in chunk["choices"][0]["delta"]
    ]
    assert all(len(fragment) == 1 for fragment in fragments)  # one fragment per index per chunk
    first, *rest = (fragment[0] for fragment in fragments)
    assert first["index"] == 0 and first["type"] == "function" and first["id"].startswith("call_")
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    assert all(
        set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"} for piece in rest
    )
    assert json.loads("".join(piece["function"]["arguments"] for piece in rest)) == {"step": 1}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    with client.chat.completions.stream(
        model="mock-1", messages=USER, tools=TOOLS, tool_choice="required"
    ) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"step": 1}


def test_chat_tool_result_round_trip(client):
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "rain all day"},
    ]
    completion = client.chat.completions.create(model="mock-1", messages=messages, tools=TOOLS, max_tokens=2)
    assert completion.choices[0].message.content == "w0 w1 "
    assert completion.usage.prompt_tokens == 6  # the tool's answer reached the prompt


def test_completions(client):
    completion = client.completions.create(model="mock-1", prompt="once upon", max_tokens=2)
    Completion.model_validate(completion.model_dump())
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "w0 w1 "
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens == 2
    echoed = client.completions.create(model="mock-1", prompt=["once upon "], max_tokens=1, echo=True)
    assert echoed.choices[0].text == "once upon w0 "


def test_completions_default_max_tokens_is_16(client):
    completion = client.completions.create(model="mock-1", prompt="go")
    assert completion.usage.completion_tokens == 16


def test_completions_logprobs(client):
    completion = client.completions.create(model="mock-1", prompt="hi ", max_tokens=2, logprobs=1, echo=True)
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == ["w0 ", "w1 "]
    assert logprobs.token_logprobs == [-0.5, -0.5]
    assert logprobs.top_logprobs == [{"w0": -0.5}, {"w1": -0.5}]
    assert logprobs.text_offset == [3, 6]


def test_completions_stream(http, client):
    response = http.post(
        "/v1/completions",
        json={"model": "mock-1", "prompt": "a b", "max_tokens": 2, "stream": True, "echo": True},
    )
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == "a bw0 w1 "
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(model="mock-1", prompt="x", max_tokens=3, stream=True)
    )
    assert text == "w0 w1 w2 "


def test_embeddings_float_and_base64_agree(client, http):
    default = client.embeddings.create(model="mock-1", input=["one two", "three"])  # the SDK asks for base64
    CreateEmbeddingResponse.model_validate(default.model_dump())
    raw = http.post("/v1/embeddings", json={"model": "mock-1", "input": ["one two", "three"]}).json()
    assert isinstance(raw["data"][0]["embedding"], list)
    for decoded, plain in zip(default.data, raw["data"], strict=True):
        assert decoded.embedding == pytest.approx(plain["embedding"])
    assert len(default.data[0].embedding) == 8
    assert default.usage.prompt_tokens == 3
    encoded = http.post(
        "/v1/embeddings", json={"model": "mock-1", "input": "one two", "encoding_format": "base64"}
    ).json()
    vector = struct.unpack("<8f", base64.b64decode(encoded["data"][0]["embedding"]))
    assert vector == pytest.approx(raw["data"][0]["embedding"])


def test_embeddings_token_ids_and_dimensions(client, http):
    shortened = client.embeddings.create(
        model="mock-1", input=[[1, 2, 3]], dimensions=3, encoding_format="float"
    )
    vector = shortened.data[0].embedding
    assert len(vector) == 3
    assert sum(value * value for value in vector) == pytest.approx(1.0)
    too_many = http.post("/v1/embeddings", json={"model": "mock-1", "input": "x", "dimensions": 9})
    assert too_many.status_code == 400
    assert too_many.json()["error"]["param"] == "dimensions"
    empty = http.post("/v1/embeddings", json={"model": "mock-1", "input": []})
    assert (empty.status_code, empty.json()["error"]["param"]) == (400, "input")


def test_models_list_and_retrieve(client, control_app, api_key):
    import anthropic

    ids = [model.id for model in client.models.list()]
    assert ids == ["mock-1", "claude-swarm-mock-1"]
    alias = client.models.retrieve("claude-swarm-mock-1")
    Model.model_validate(alias.model_dump())
    assert alias.owned_by == "swarm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")

    transport = httpx2.WSGITransport(app=control_app, remote_addr="127.0.0.1")
    with httpx2.Client(transport=transport, base_url="http://127.0.0.1") as http_client:
        claude = anthropic.Anthropic(
            base_url="http://127.0.0.1", api_key=api_key, http_client=http_client, max_retries=0
        )
        listed = list(claude.models.list(limit=1))
    assert [model.id for model in listed] == ["mock-1", "claude-swarm-mock-1"]  # paged through
    assert listed[1].display_name == "mock-1 (swarm)"
    assert listed[0].max_input_tokens == 4096


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_unknown_model_is_404(http, client):
    error = error_of(http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": USER}), 404)
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x")


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"model": 7}, "model"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
    ],
)
def test_bad_fields_are_400_naming_the_field(http, change, param):
    body = {"model": "mock-1", "messages": USER, **change}
    error = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_body_must_be_a_json_object(http):
    error_of(http.post("/v1/chat/completions", content=b"[1, 2]"), 400)
    error_of(http.post("/v1/chat/completions", content=b"{nope"), 400)


def test_images_are_refused(client):
    parts = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    with pytest.raises(openai.BadRequestError, match="images are not supported"):
        client.chat.completions.create(model="mock-1", messages=[{"role": "user", "content": parts}])


def test_context_overflow(http):
    long = [{"role": "user", "content": "word " * 5000}]
    error = error_of(http.post("/v1/chat/completions", json={"model": "mock-1", "messages": long}), 400)
    assert error["code"] == "context_length_exceeded"
    assert "5000" in error["message"]


def test_an_integer_beyond_64_bits_is_refused_by_name(http):
    # 1e300 is an integer-valued float; taken as max_tokens it would never end.
    for field, path in (("max_tokens", "/v1/chat/completions"), ("seed", "/v1/completions")):
        body = {"model": "mock-1", "messages": USER, "prompt": "x", field: 1e300}
        error = error_of(http.post(path, json=body), 400)
        assert error["param"] == field and "out of range" in error["message"]
    # A JSON integer literal of 400 digits, too large for any float.
    raw = '{"model": "mock-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1%s}' % (
        "0" * 400
    )
    error = error_of(http.post("/v1/chat/completions", content=raw), 400)
    assert error["param"] == "max_tokens" and "out of range" in error["message"]


def test_node_down_is_503(http, node_server, client):
    node_server.close()
    response = http.post("/v1/chat/completions", json={"model": "mock-1", "messages": USER})
    error_of(response, 503)
    assert int(response.headers["Retry-After"]) >= 1
    with pytest.raises(openai.InternalServerError):
        client.models.list()


def test_client_disconnect_cancels_the_generation(control_app, api_key, mock_backend):
    mock_backend.delay_s = 0.02
    response = control_app.test_client().post(
        "/v1/chat/completions",
        json={"model": "mock-1", "messages": USER, "max_tokens": 1000, "stream": True},
        headers={"Authorization": f"Bearer {api_key}"},
        buffered=False,
    )
    frames = iter(response.response)
    assert b'"role":"assistant"' in next(frames)
    assert b"w0" in next(frames)
    response.close()
    deadline = time.monotonic() + 5
    while mock_backend.cancelled_runs < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mock_backend.cancelled_runs == 1


def _call(**fields) -> Call:
    request = GenerationRequest(
        model="m", sampling=SamplingParams(), messages=({"role": "user", "content": "x"},)
    )
    return Call(request, stream=True, include_usage=False, **fields)


def test_stream_error_midway_is_one_error_frame_without_done():
    events = [
        {"event": "start", "model": "m", "prompt_tokens": 1},
        {"event": "keepalive"},
        {"event": "text", "text": "w0 ", "token_id": 0},
        {"event": "error", "code": "overloaded", "message": "the node's queue is full"},
    ]
    frames = list(errors_in_band(chat_frames(iter(events), _call(), created=1)))
    assert KEEPALIVE_FRAME in frames
    assert DONE_FRAME not in frames
    error = json.loads(frames[-1].removeprefix("data: "))["error"]
    assert error["message"] == "the node's queue is full"
    assert error["code"] == "rate_limit_exceeded"


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-50, 50)
    | st.floats()
    | st.text(max_size=4)
    | st.sampled_from(["text", "image_url", "function", "auto", "required", "user", "assistant", "tool"]),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                ["type", "text", "name", "role", "content", "function", "arguments", "tool_calls"]
            ),
            children,
            max_size=3,
        )
    ),
    max_leaves=10,
)
FIELDS = [
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
]
FIELDS += [
    "stop",
    "n",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "prompt",
    "echo",
]
FIELDS += ["input", "encoding_format", "dimensions"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]),
    changes=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=3),
)
def test_no_body_gets_a_server_error(http, path, changes):
    body = {"model": "mock-1", "messages": USER, "max_tokens": 2, "prompt": "x", "input": "y", **changes}
    response = http.post(path, content=json.dumps(body))
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
