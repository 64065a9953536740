"""Tool calls: JSON prefix scanning against json.loads, constraints, stream parsers, messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.tool_calls import (
    Event,
    ForcedToolCallStream,
    JsonObjectConstraint,
    JsonPrefix,
    JsonScanner,
    ToolCallConstraint,
    ToolCallParser,
    new_call_id,
    template_messages,
    tool_system_prompt,
)

REPO = Path(__file__).resolve().parent.parent

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


def loads_ok(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def is_complete(text: str) -> bool:
    state = JsonPrefix.check(text)
    return state is not None and state.complete


@settings(max_examples=150, deadline=None)
@given(value=json_values, indent=st.sampled_from([None, 2]), ensure_ascii=st.booleans())
def test_every_prefix_of_dumped_json_is_accepted(value: Any, indent: int | None, ensure_ascii: bool) -> None:
    text = json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)
    scanner = JsonScanner()
    for end in range(len(text)):
        state = JsonPrefix.check(text[:end])
        assert state is not None, text[:end]
        if isinstance(value, (dict, list)):
            assert not state.complete, text[:end]
        # Feeding one character at a time lands where a one-shot check does.
        assert scanner.feed(text[end])
    assert is_complete(text)
    assert scanner.complete
    assert JsonPrefix.check(text + " \n") == JsonPrefix.check(text)


@settings(max_examples=300, deadline=None)
@given(
    value=json_values,
    position=st.integers(min_value=0),
    character=st.sampled_from(list('{}[]":,.-+eE01a\\ tfnu')),
    delete=st.booleans(),
)
def test_mutated_json_is_complete_exactly_when_json_loads_accepts_it(
    value: Any, position: int, character: str, delete: bool
) -> None:
    text = json.dumps(value)
    position %= len(text) + 1
    mutated = text[:position] + ("" if delete else character) + text[position + delete :]
    assert is_complete(mutated) == loads_ok(mutated), mutated


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet='{}[]":,.-+eE019 tfrueals\\n', max_size=14), cut=st.integers(min_value=0))
def test_scan_is_prefix_closed_and_matches_json_loads(text: str, cut: int) -> None:
    state = JsonPrefix.check(text)
    assert (state is not None and state.complete) == loads_ok(text)
    cut %= len(text) + 1
    head = JsonPrefix.check(text[:cut])
    if head is None:
        assert state is None  # what is rejected stays rejected, however it continues
    # Incremental feeding in two parts agrees with the one-shot check.
    scanner = JsonScanner()
    fed = scanner.feed(text[:cut]) and scanner.feed(text[cut:])
    assert fed == (state is not None)
    if state is not None:
        assert (scanner.complete, scanner.depth) == (state.complete, state.depth)


@pytest.mark.parametrize(
    "text",
    [
        '{"a":}',
        "[1,]",
        '{"a" 1}',
        "01",
        '"\\x"',
        "{}}",
        "tru e",
        "-a",
        "1.e",
        ".5",
        "+1",
        "[1 2]",
        "{1:2}",
        '{"a":1,}',
        "[}",
        "{]",
        '"\\u12g4"',
        "'a'",
        '"a\nb"',
        "nulx",
        "1e+-1",
        "[] []",
        "00",
        "-01",
    ],
)
def test_rejects_text_that_starts_no_json_value(text: str) -> None:
    assert not loads_ok(text)
    assert JsonPrefix.check(text) is None


def test_state_reports_depth_and_completion() -> None:
    assert JsonPrefix.check("") == JsonPrefix.check("  ")
    assert JsonPrefix.check('{"a": [1, {"b"').depth == 3
    assert JsonPrefix.check("12").complete  # whole, yet "123" would be too
    assert not JsonPrefix.check("12.").complete
    assert JsonPrefix.check('{"a": [1]} ').complete
    assert JsonPrefix.check('"\\ud83d\\ude00"').complete


def test_copy_is_independent() -> None:
    scanner = JsonScanner()
    assert scanner.feed('{"a": [')
    trial = scanner.copy()
    assert trial.feed("1]}") and trial.complete
    assert not scanner.complete and scanner.depth == 2
    assert not scanner.copy().feed("}")
    assert scanner.feed("]}") and scanner.complete


def feed_all(constraint: Any, pieces: list[str]) -> bool:
    for piece in pieces:
        if not constraint.accepts(piece):
            return False
        constraint.advance(piece)
    return True


def test_json_object_constraint() -> None:
    assert not JsonObjectConstraint().accepts("[")
    assert not JsonObjectConstraint().accepts('"a"')
    assert not JsonObjectConstraint().accepts("1")
    assert not JsonObjectConstraint().accepts("")
    constraint = JsonObjectConstraint()
    assert feed_all(constraint, [" ", '{"a"', ": [1,", "\n  ", "2]"])
    assert not constraint.accepts("\n     ")  # a run of 5 whitespace characters
    assert not constraint.accepts("\n\n\n\n\n")
    assert not constraint.complete
    assert not constraint.accepts("}}")
    constraint.advance("}")
    assert constraint.complete
    assert not constraint.accepts(" ")  # the generator must stop now
    with pytest.raises(ValueError, match="not accepted"):
        constraint.advance("x")
    # Whitespace inside strings is text, not a run to limit.
    assert feed_all(JsonObjectConstraint(), ['{"a": "', " " * 20, '"}'])


CALL_TEXTS = [
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2.5e3, true, null]}}',
    '{"name": "get_time", "arguments": {}}',
    '{"name": "get_time", "arguments": { } \n}',
    '{"name": "get", "arguments": {"q": "}\\""}}',
]


@pytest.mark.parametrize("text", CALL_TEXTS)
def test_tool_call_constraint_accepts_allowed_text_split_anywhere(text: str) -> None:
    name = json.loads(text)["name"]
    arguments_end = text.rindex("}", 0, len(text) - 1) + 1
    arguments_text = text[text.index('"arguments": ') + len('"arguments": ') : arguments_end]
    for cut in range(1, len(text)):
        constraint = ToolCallConstraint(["get_weather", "get_time", "get"])
        assert feed_all(constraint, [text[:cut]]), cut
        assert not constraint.complete
        assert constraint.name == (name if cut >= text.index('"arguments": ') + 13 else None)
        assert feed_all(constraint, [text[cut:]]), cut
        assert constraint.complete
        assert constraint.name == name
        assert constraint.arguments_text == arguments_text
        assert not constraint.accepts("}") and not constraint.accepts(" ")


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_date"',
        '{"name": "get_weather_now"',
        '{"name":"get"',
        ' {"name"',
        '{"name": "get", "arguments": [',
        '{"name": "get", "arguments": "x"',
        '{"name": "get", "arguments": 1',
        '{"name": "get", "arguments": {}}}',
        '{"name": "get", "arguments": {}} x',
        '{"name": "get", "arguments": {}}\n',
        '{"name": "get", "arguments": {      ',
        '{"name": "get", "arguments": {}      }',
    ],
)
def test_tool_call_constraint_rejects(text: str) -> None:
    whole = ToolCallConstraint(["get", "get_weather"])
    assert not whole.accepts(text)
    per_character = ToolCallConstraint(["get", "get_weather"])
    assert not feed_all(per_character, list(text))


def test_tool_call_constraint_needs_names_and_quotes_them() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ToolCallConstraint([])
    constraint = ToolCallConstraint(['say "hi"'])
    assert feed_all(constraint, ['{"name": "say \\"hi\\"", "arguments": {}}'])
    assert constraint.name == 'say "hi"'
    assert not ToolCallConstraint(["f"]).accepts("")


def normalized(events: list[Event]) -> list[Event]:
    """Adjacent text events joined and argument deltas joined: what a client reassembles."""
    result: list[Any] = []
    for event in events:
        if result and event[0] in ("text", "arguments") and result[-1][:-1] == event[:-1]:
            result[-1] = (*event[:-1], result[-1][-1] + event[-1])
        else:
            result.append(event)
    return result


def parse(*pieces: str) -> list[Event]:
    parser = ToolCallParser()
    events: list[Event] = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    events.extend(parser.finish())
    for event in events:
        assert event[0] != "text" or event[1], "empty text event"
    return normalized(events)


def call(index: int, name: str, arguments: dict[str, Any]) -> list[Event]:
    return [("tool_call", index, name), ("arguments", index, json.dumps(arguments)), ("tool_call_end", index)]


def test_parser_finds_a_call_split_at_every_offset() -> None:
    text = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call> Done.'
    want = [
        ("text", "Let me check. "),
        *call(0, "get_weather", {"city": "Paris"}),
        ("text", " Done."),
    ]
    for cut in range(len(text) + 1):
        assert parse(text[:cut], text[cut:]) == want, cut
    assert parse(*text) == want


def test_parser_holds_back_only_a_possible_tag() -> None:
    parser = ToolCallParser()
    assert parser.feed("Hello <tool") == [("text", "Hello ")]
    assert parser.feed("box> a < b") == [("text", "<toolbox> a < b")]
    assert parser.feed(" <") == [("text", " ")]
    assert parser.finish() == [("text", "<")]


def test_parser_two_calls_and_invalid_blocks() -> None:
    first = '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>'
    second = '<tool_call>\n{"name": "b"}\n</tool_call>'
    assert parse(first + "\n" + second) == [*call(0, "a", {"x": 1}), ("text", "\n"), *call(1, "b", {})]
    broken = '<tool_call>{"name": "a", "arguments": {"x": }</tool_call>'
    assert parse("x " + broken + " y") == [("text", "x " + broken + " y")]
    not_a_call = '<tool_call>{"arguments": {}}</tool_call>'
    assert parse(not_a_call + first) == [("text", not_a_call), *call(0, "a", {"x": 1})]
    assert parse('<tool_call>{"name": "a", "arguments": [1]}</tool_call>') == [
        ("text", '<tool_call>{"name": "a", "arguments": [1]}</tool_call>')
    ]


def test_parser_unterminated_block_at_finish() -> None:
    assert parse('ok <tool_call>{"name": "a", "arguments": {}}') == [("text", "ok "), *call(0, "a", {})]
    assert parse('<tool_call>{"name": "a", "argu') == [("text", '<tool_call>{"name": "a", "argu')]


def test_parser_arguments_given_as_json_text() -> None:
    text = '<tool_call>{"name": "a", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>'
    assert parse(text) == call(0, "a", {"city": "Paris"})
    bad = '<tool_call>{"name": "a", "arguments": "Paris"}</tool_call>'
    assert parse(bad) == [("text", bad)]


def test_parser_bare_json_whole_output_is_a_call() -> None:
    text = '\n {"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    parser = ToolCallParser()
    assert [event for piece in text for event in parser.feed(piece)] == []  # held until finish
    assert parser.finish() == call(0, "get_weather", {"city": "Paris"})
    # Anything after the object makes it text, and it streams as soon as that is known.
    parser = ToolCallParser()
    assert parser.feed('{"name": "f", "arguments": {}}') == []
    assert parser.feed(" and more") == [("text", '{"name": "f", "arguments": {}} and more')]
    # An object that is not a call is text once it closes; broken JSON once it breaks.
    parser = ToolCallParser()
    assert parser.feed('{"a": 1') == []
    assert parser.feed("}") == [("text", '{"a": 1}')]
    parser = ToolCallParser()
    assert parser.feed("{ not json <tool") == [("text", "{ not json ")]
    assert parse("   ") == [("text", "   ")]
    assert parse('{"name": "f", "arg') == [("text", '{"name": "f", "arg')]


def test_forced_tool_call_stream_events() -> None:
    constraint = ToolCallConstraint(["get_weather"])
    stream = ForcedToolCallStream(constraint)
    events: list[Event] = []
    pieces = ['{"name": "get', '_weather", "arguments": {"ci', 'ty": "Paris"', "}", " ", "}"]
    for piece in pieces:
        assert constraint.accepts(piece)
        constraint.advance(piece)
        events.extend(stream.feed(piece))
    assert events == [
        ("tool_call", 0, "get_weather"),
        ("arguments", 0, '{"ci'),
        ("arguments", 0, 'ty": "Paris"'),
        ("arguments", 0, "}"),
        ("tool_call_end", 0),
    ]


TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]


def test_tool_system_prompt_lists_tools_one_json_line_each() -> None:
    prompt = tool_system_prompt([*TOOLS, {"name": "now", "description": "Time", "parameters": {}}])
    inside = prompt.split("<tools>\n")[1].split("\n</tools>")[0].split("\n")
    assert [json.loads(line) for line in inside] == [
        *TOOLS,
        {"name": "now", "description": "Time", "parameters": {}},
    ]
    assert "<tool_call>" in prompt and '"arguments"' in prompt


def test_template_messages_renders_calls_and_results() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                {"id": "call_2", "name": "get_weather", "arguments": "not json"},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "name": "get_weather", "content": "rain"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "name": "f", "arguments": "{}"}]},
    ]
    result = template_messages(messages, TOOLS)
    assert [message["role"] for message in result] == ["system", "user", "assistant", "user", "assistant"]
    assert result[0]["content"] == "Be brief.\n\n" + tool_system_prompt(TOOLS)
    assert result[2]["content"] == (
        "Checking.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": "not json"}\n</tool_call>'
    )
    assert result[3]["content"] == (
        '<tool_response>\n{"name": "get_weather", "content": "sunny"}\n</tool_response>\n'
        '<tool_response>\n{"name": "get_weather", "content": "rain"}\n</tool_response>'
        "\n\nThanks"
    )
    assert result[4]["content"] == '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'


def test_template_messages_system_prompt_and_merging() -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert template_messages(messages, []) == [{"role": "user", "content": "a\n\nb"}]
    with_tools = template_messages(messages, TOOLS)
    assert with_tools[0] == {"role": "system", "content": tool_system_prompt(TOOLS)}
    assert len(with_tools) == 2
    late_system = [*messages, {"role": "system", "content": "late"}]
    assert template_messages(late_system, TOOLS)[-1]["content"] == "late\n\n" + tool_system_prompt(TOOLS)
    assert messages == [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]  # untouched
    with pytest.raises(ValueError, match="unknown message role 'function'"):
        template_messages([{"role": "function", "content": "x"}], [])


def test_new_call_id() -> None:
    first, second = new_call_id(), new_call_id("toolu_")
    assert first.startswith("call_") and len(first) == 29 and first[5:].isalnum()
    assert second.startswith("toolu_") and first[5:] != second[6:]


def test_import_pulls_in_neither_jax_nor_numpy() -> None:
    code = (
        "import sys, swarm.tool_calls\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'numpy'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}


def test_tool_call_constraint_holds_arguments_to_the_tool_schema() -> None:
    schemas = {"get_weather": WEATHER_PARAMETERS, "now": {}, "echo": {"type": "string"}}
    text = '{"name": "get_weather", "arguments": {"unit": "celsius", "city": "Paris"} }'
    for cut in range(1, len(text)):
        constraint = ToolCallConstraint(["get_weather", "now", "echo"], schemas=schemas)
        assert feed_all(constraint, [text[:cut], text[cut:]]), cut
        assert constraint.complete and constraint.name == "get_weather"
        assert constraint.arguments_text == '{"unit": "celsius", "city": "Paris"}'
    head = '{"name": "get_weather", "arguments": '
    for arguments in [
        '{"type": "object"',  # what a tiny model writes unguided: the schema itself
        '{"city": 1',
        '{"unit": "kelvin"',
        '{"unit": "celsius"}',  # the required city is missing
        '{"city": "a", "city"',
        "[",
    ]:
        assert not ToolCallConstraint(["get_weather"], schemas=schemas).accepts(head + arguments), arguments
    # An empty schema or one that allows no object: any object; a tool without one too.
    for name in ("now", "echo", "get_time"):
        constraint = ToolCallConstraint(["now", "echo", "get_time"], schemas=schemas)
        call = '{"name": ' + json.dumps(name) + ', "arguments": {"a": [1, {"b": null}]}}'
        assert feed_all(constraint, [call]) and constraint.complete, name


def test_forced_tool_call_stream_with_a_schema() -> None:
    constraint = ToolCallConstraint(["get_weather"], schemas={"get_weather": WEATHER_PARAMETERS})
    stream = ForcedToolCallStream(constraint)
    events: list[Event] = []
    for piece in ['{"name": "get_weather", "arguments": {"', 'city": "Pa', 'ris"}', "}"]:
        assert constraint.accepts(piece)
        constraint.advance(piece)
        events.extend(stream.feed(piece))
    assert normalized(events) == [
        ("tool_call", 0, "get_weather"),
        ("arguments", 0, '{"city": "Paris"}'),
        ("tool_call_end", 0),
    ]
