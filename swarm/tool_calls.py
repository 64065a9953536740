"""Tool calls for models whose chat templates know no tools: prompt, constraints, parsers.

Owns the pure pieces of tool calling and JSON mode. Tools are described in a system
prompt and the model answers in the Hermes/Qwen format,
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`:

- `tool_system_prompt` and `template_messages` turn API messages (with tool calls and
  tool results) into plain system/user/assistant messages any chat template renders.
- `JsonScanner` / `JsonPrefix` decide exactly (RFC 8259) whether text is a prefix of one
  JSON value, incrementally, so constrained decoding can test ~200 candidate pieces per
  token on a cheap copy of the scanner for the accepted text.
- `JsonObjectConstraint` and `ToolCallConstraint` implement the `Constraint` protocol the
  generator uses when a tool is forced or `response_format` is `json_object`; given the
  tool's parameter schema, a forced call's arguments are held to it
  (`swarm.schema_constraint`).
- `ToolCallParser` (free output) and `ForcedToolCallStream` (constrained output) turn
  generated text into stream events for the API layer.

Imports only the standard library: never jax or numpy, so API processes stay light.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from swarm.schema_constraint import SchemaScanner

Event = (
    tuple[Literal["text"], str]
    | tuple[Literal["tool_call"], int, str]
    | tuple[Literal["arguments"], int, str]
    | tuple[Literal["tool_call_end"], int]
)

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


def tool_system_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """Instructions listing `tools` ({"name", "description", "parameters"}) one JSON line each."""
    lines = [
        json.dumps(
            {
                "name": tool["name"],
                "description": tool.get("description", ""),
                "parameters": tool.get("parameters", {"type": "object", "properties": {}}),
            },
            ensure_ascii=False,
        )
        for tool in tools
    ]
    return (
        "You can call tools. The available tools, one JSON object per line:\n"
        "<tools>\n" + "\n".join(lines) + "\n</tools>\n"
        'To call a tool, reply with a JSON object holding "name" and "arguments" '
        f"inside {TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} tags:\n"
        f'{TOOL_CALL_OPEN}\n{{"name": "<tool name>", "arguments": {{<arguments>}}}}\n{TOOL_CALL_CLOSE}\n'
        "Write one block per call. If no tool is needed, answer normally."
    )


def _call_block(name: str, arguments: Any) -> str:
    # History shows the model the same shape it is asked to write: arguments as an object.
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments)
    elif arguments is None:
        arguments = {}
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def _join(*parts: str) -> str:
    return "\n\n".join(part for part in parts if part)


def template_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
) -> list[dict[str, str]]:
    """API messages (system/user/assistant/tool, with tool calls) -> system/user/assistant only."""
    converted: list[dict[str, str]] = []
    names_by_id: dict[str, str] = {}
    previous_was_tool = False
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"message content must be a string or null, got {type(content).__name__}")
        if role in ("system", "user"):
            converted.append({"role": role, "content": content})
        elif role == "assistant":
            blocks = [content] if content else []
            for call in message.get("tool_calls") or ():
                names_by_id[call.get("id") or ""] = call["name"]
                blocks.append(_call_block(call["name"], call.get("arguments")))
            converted.append({"role": "assistant", "content": "\n".join(blocks)})
        elif role == "tool":
            # Results name their tool, by "name" or through the id of the call they answer.
            name = message.get("name") or names_by_id.get(message.get("tool_call_id") or "")
            response = {"name": name, "content": content} if name else {"content": content}
            block = f"<tool_response>\n{json.dumps(response, ensure_ascii=False)}\n</tool_response>"
            if previous_was_tool:
                converted[-1]["content"] += "\n" + block
            else:
                converted.append({"role": "user", "content": block})
        else:
            raise ValueError(f"unknown message role {role!r}: expected system, user, assistant or tool")
        previous_was_tool = role == "tool"
    if tools:
        prompt = tool_system_prompt(tools)
        system = next((message for message in converted if message["role"] == "system"), None)
        if system is None:
            converted.insert(0, {"role": "system", "content": prompt})
        else:
            system["content"] = _join(system["content"], prompt)
    # Strictly alternating templates (Gemma raises on user/user) need one message per turn.
    merged: list[dict[str, str]] = []
    for message in converted:
        if merged and merged[-1]["role"] == message["role"]:
            merged[-1]["content"] = _join(merged[-1]["content"], message["content"])
        else:
            merged.append(dict(message))
    return merged


# JSON scanner modes. Between tokens: where whitespace may appear (RFC 8259 section 2).
_VALUE, _VALUE_OR_CLOSE, _KEY, _KEY_OR_CLOSE, _COLON, _AFTER_VALUE, _DONE = range(7)
_STRING, _ESCAPE, _UNICODE, _LITERAL, _ERROR = range(7, 12)
# Number grammar (section 6): -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?
_MINUS, _ZERO, _INTEGER, _DOT, _FRACTION, _EXPONENT, _EXPONENT_SIGN, _EXPONENT_DIGITS = range(12, 20)
_NUMBER_ENDS = frozenset({_ZERO, _INTEGER, _FRACTION, _EXPONENT_DIGITS})
_BETWEEN = frozenset({_VALUE, _VALUE_OR_CLOSE, _KEY, _KEY_OR_CLOSE, _COLON, _AFTER_VALUE, _DONE})
_WHITESPACE = frozenset(" \t\n\r")
_DIGITS = frozenset("0123456789")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_SIMPLE_ESCAPES = frozenset('"\\/bfnrt')
_LITERAL_TAILS = {"t": "rue", "f": "alse", "n": "ull"}
# The number grammar as transitions over character classes: "0", "1" (1-9), ".", "e" (eE), "+" (+-).
_NUMBER_CLASSES = dict(zip("0123456789.eE+-", "0111111111.ee++", strict=True))
_NUMBER_TRANSITIONS: dict[int, dict[str, int]] = {
    _MINUS: {"0": _ZERO, "1": _INTEGER},
    _ZERO: {".": _DOT, "e": _EXPONENT},  # no more digits: "01" is not a number
    _INTEGER: {"0": _INTEGER, "1": _INTEGER, ".": _DOT, "e": _EXPONENT},
    _DOT: {"0": _FRACTION, "1": _FRACTION},
    _FRACTION: {"0": _FRACTION, "1": _FRACTION, "e": _EXPONENT},
    _EXPONENT: {"+": _EXPONENT_SIGN, "0": _EXPONENT_DIGITS, "1": _EXPONENT_DIGITS},
    _EXPONENT_SIGN: {"0": _EXPONENT_DIGITS, "1": _EXPONENT_DIGITS},
    _EXPONENT_DIGITS: {"0": _EXPONENT_DIGITS, "1": _EXPONENT_DIGITS},
}


class JsonScanner:
    """Pushdown scanner: is the text fed so far a prefix of one JSON value?

    The stack of open containers is a str ("{[{"), so `copy` shares it instead of
    copying a list: testing a candidate piece costs a handful of attribute copies.
    `object_only` requires the top-level value to be an object; `max_whitespace_run`
    refuses longer runs of whitespace outside strings.
    """

    def __init__(self, object_only: bool = False, max_whitespace_run: int | None = None) -> None:
        self.object_only = object_only
        self.max_whitespace_run = max_whitespace_run
        self.mode = _VALUE
        self.stack = ""
        self.is_key = False
        self.literal = ""
        self.hex_left = 0
        self.whitespace_run = 0

    def copy(self) -> JsonScanner:
        other = JsonScanner.__new__(JsonScanner)
        other.__dict__.update(self.__dict__)  # every field is immutable, so this is a full copy
        return other

    @property
    def complete(self) -> bool:
        """A whole value has been read (a top-level number is whole but may still grow)."""
        return self.mode == _DONE or (not self.stack and self.mode in _NUMBER_ENDS)

    @property
    def depth(self) -> int:
        return len(self.stack)

    def feed(self, text: str) -> bool:
        """Consume `text`; False (and stays False) once the text can start no JSON value."""
        for character in text:
            if not self._step(character):
                self.mode = _ERROR
                return False
        return True

    def _end_value(self) -> None:
        self.mode = _AFTER_VALUE if self.stack else _DONE

    def _close(self, character: str) -> bool:
        if not self.stack or self.stack[-1] != ("{" if character == "}" else "["):
            return False
        self.stack = self.stack[:-1]
        self._end_value()
        return True

    def _step(self, character: str) -> bool:
        mode = self.mode
        if mode == _STRING:  # the common case first
            if character == '"':
                if self.is_key:
                    self.mode = _COLON
                else:
                    self._end_value()
            elif character == "\\":
                self.mode = _ESCAPE
            elif character < " ":  # control characters must be escaped (section 7)
                return False
            return True
        if mode in _BETWEEN:
            if character in _WHITESPACE:
                self.whitespace_run += 1
                return self.max_whitespace_run is None or self.whitespace_run <= self.max_whitespace_run
            self.whitespace_run = 0
            if mode in (_VALUE, _VALUE_OR_CLOSE):
                if character == "]" and mode == _VALUE_OR_CLOSE:
                    return self._close(character)
                return self._start_value(character)
            if mode == _KEY_OR_CLOSE and character == "}":
                return self._close(character)
            if mode in (_KEY, _KEY_OR_CLOSE):
                self.mode, self.is_key = _STRING, True
                return character == '"'
            if mode == _COLON:
                self.mode = _VALUE
                return character == ":"
            if mode == _AFTER_VALUE:
                if character == ",":
                    self.mode = _KEY if self.stack[-1] == "{" else _VALUE
                    return True
                return character in "]}" and self._close(character)
            return False  # _DONE: only whitespace may follow a whole value
        if mode == _ESCAPE:
            if character == "u":
                self.mode, self.hex_left = _UNICODE, 4
                return True
            self.mode = _STRING
            return character in _SIMPLE_ESCAPES
        if mode == _UNICODE:
            self.hex_left -= 1
            if self.hex_left == 0:
                self.mode = _STRING
            return character in _HEX_DIGITS
        if mode == _LITERAL:
            if character != self.literal[0]:
                return False
            self.literal = self.literal[1:]
            if not self.literal:
                self._end_value()
            return True
        return self._number_step(mode, character)

    def _start_value(self, character: str) -> bool:
        if self.object_only and not self.stack and character != "{":
            return False
        if character == "{" or character == "[":
            self.stack += character
            self.mode = _KEY_OR_CLOSE if character == "{" else _VALUE_OR_CLOSE
        elif character == '"':
            self.mode, self.is_key = _STRING, False
        elif character == "-":
            self.mode = _MINUS
        elif character in _DIGITS:
            self.mode = _ZERO if character == "0" else _INTEGER
        elif character in _LITERAL_TAILS:
            self.mode, self.literal = _LITERAL, _LITERAL_TAILS[character]
        else:
            return False
        return True

    def _number_step(self, mode: int, character: str) -> bool:
        next_mode = _NUMBER_TRANSITIONS.get(mode, {}).get(_NUMBER_CLASSES.get(character, ""))
        if next_mode is not None:
            self.mode = next_mode
            return True
        if mode not in _NUMBER_ENDS:
            return False
        # A number ends only at a character it cannot take; that one belongs to what follows.
        self._end_value()
        return self._step(character)


@dataclass(frozen=True)
class JsonState:
    complete: bool
    depth: int


class JsonPrefix:
    @staticmethod
    def check(text: str) -> JsonState | None:
        """None if `text` is the prefix of no single JSON value, else where the scan stands."""
        scanner = JsonScanner()
        if not scanner.feed(text):
            return None
        return JsonState(complete=scanner.complete, depth=scanner.depth)


class Constraint(Protocol):
    def accepts(self, piece: str) -> bool: ...
    def advance(self, piece: str) -> None: ...
    @property
    def complete(self) -> bool: ...


class JsonObjectConstraint:
    """Output is one JSON object (`response_format: json_object`)."""

    def __init__(self, max_whitespace_run: int = 4) -> None:
        # Tiny models loop on newlines when whitespace is free; a short run is all JSON needs.
        self._scanner = JsonScanner(object_only=True, max_whitespace_run=max_whitespace_run)

    def accepts(self, piece: str) -> bool:
        # An empty piece would let the generator pick a token that changes nothing, forever.
        return bool(piece) and not self._scanner.complete and self._scanner.copy().feed(piece)

    def advance(self, piece: str) -> None:
        if not self.accepts(piece):
            raise ValueError(f"piece {piece!r} was not accepted")
        self._scanner.feed(piece)

    @property
    def complete(self) -> bool:
        return self._scanner.complete


@dataclass(frozen=True)
class _CallProgress:
    matched: str  # the fixed literal so far, until a name is chosen
    name: str | None
    arguments: JsonScanner | SchemaScanner  # the arguments scanner, once a name is chosen
    arguments_text: str
    tail_whitespace: int
    complete: bool


class ToolCallConstraint:
    """Output is `{"name": "<one of names>", "arguments": {...}}`, the body of a forced call.

    `schemas` maps a tool name to its parameters' JSON Schema: that tool's arguments can
    then only be an instance of it (an object; a schema that allows no object, such as
    `{"type": "string"}`, falls back to any object). Without one, any object.
    """

    def __init__(
        self,
        names: Sequence[str],
        max_whitespace_run: int = 4,
        schemas: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        if not names:
            raise ValueError("a forced tool call needs at least one tool name")
        # Quoting the name makes every literal end at its closing quote, so none is a prefix
        # of another and the first literal the text starts with is the only one.
        self._literals = {
            '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": ': name for name in names
        }
        self._max_whitespace_run = max_whitespace_run
        # A fresh arguments scanner per name, copied when the name is chosen.
        self._scanners: dict[str, JsonScanner | SchemaScanner] = {
            name: SchemaScanner(schemas[name], max_whitespace_run, object_only=True)
            if schemas is not None and schemas.get(name) is not None
            else JsonScanner(object_only=True, max_whitespace_run=max_whitespace_run)
            for name in names
        }
        generic = JsonScanner(object_only=True, max_whitespace_run=max_whitespace_run)
        self._progress = _CallProgress("", None, generic, "", 0, False)
        self._arguments_after: dict[str, JsonScanner | SchemaScanner | None] = {}

    @property
    def name(self) -> str | None:
        return self._progress.name

    @property
    def arguments_text(self) -> str:
        return self._progress.arguments_text

    @property
    def complete(self) -> bool:
        return self._progress.complete

    def accepts(self, piece: str) -> bool:
        progress = self._progress
        if piece and progress.name is not None and not progress.arguments.complete:
            # The generator tries hundreds of pieces per token and most fail early: the
            # scanner after each first character is worked out once per token, and a piece
            # that cannot close the arguments is refused on the scanner alone.
            first = piece[0]
            if first in self._arguments_after:
                after = self._arguments_after[first]
            else:
                after = progress.arguments.copy()
                if not after.feed(first):
                    after = None
                self._arguments_after[first] = after
            if after is None or ("}" not in piece and not after.copy().feed(piece[1:])):
                return False
        return self._advanced(piece) is not None

    def advance(self, piece: str) -> None:
        progress = self._advanced(piece)
        if progress is None:
            raise ValueError(f"piece {piece!r} was not accepted")
        self._progress = progress
        self._arguments_after.clear()

    def _advanced(self, piece: str) -> _CallProgress | None:
        progress = self._progress
        if not piece or progress.complete:
            return None
        name, rest = progress.name, piece
        if name is None:
            matched = progress.matched + piece
            for literal, candidate in self._literals.items():
                if matched.startswith(literal):
                    name, rest = candidate, matched[len(literal) :]  # the piece may straddle
                    scanner = self._scanners[name].copy()
                    break
            else:
                if any(literal.startswith(matched) for literal in self._literals):
                    return _CallProgress(matched, None, progress.arguments, "", 0, False)
                return None
        else:
            scanner = progress.arguments.copy()
        if not scanner.complete and "}" not in rest:
            # The arguments object cannot close within `rest`: feed it whole (faster).
            if not scanner.feed(rest):
                return None
            return _CallProgress(
                "", name, scanner, progress.arguments_text + rest, progress.tail_whitespace, False
            )
        consumed, tail_whitespace, complete = 0, progress.tail_whitespace, False
        for character in rest:
            if complete:
                return None  # nothing may follow the closing brace
            if not scanner.complete:
                if not scanner.feed(character):
                    return None
                consumed += 1
            elif character in _WHITESPACE:
                tail_whitespace += 1
                if tail_whitespace > self._max_whitespace_run:
                    return None
            elif character == "}":
                complete = True
            else:
                return None
        arguments_text = progress.arguments_text + rest[:consumed]
        return _CallProgress("", name, scanner, arguments_text, tail_whitespace, complete)


def _as_call(text: str) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments) if `text` is a call object; arguments may be JSON text of an object."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return value["name"], arguments


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


_BARE, _TEXT, _BLOCK = range(3)


class ToolCallParser:
    """Free (unconstrained) output -> text and tool-call events, as it streams.

    `<tool_call>{json}</tool_call>` blocks anywhere become calls; text around them is
    text, except that a possible partial `<tool_call>` at the end of a feed waits for the
    next. A block whose JSON is not a call object is given back as text.

    Some models skip the tags and answer with a bare `{"name": ..., "arguments": ...}`.
    That counts as a call only if it is the whole output, which is known only at
    `finish`: so output that starts (after whitespace) with `{` is held back until
    `finish`, or until it stops being a prefix of one JSON object, or closes as an object
    that is not a call. Leading whitespace is held back too, since a `{` may follow.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._phase = _BARE
        self._bare = JsonScanner(object_only=True)
        self._bare_is_call = False
        self._index = 0

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        if self._phase == _BARE:  # the bare-call scanner also takes the leading whitespace
            if self._bare.feed(text):
                if not self._bare.complete:
                    return []
                # Parse once, when the object closes; later feeds may add only whitespace.
                self._bare_is_call = self._bare_is_call or _as_call(self._buffer) is not None
                if self._bare_is_call:
                    return []
            self._phase = _TEXT
        return self._scan(final=False)

    def finish(self) -> list[Event]:
        if self._phase == _BARE:
            call = _as_call(self._buffer)
            if call is not None:
                self._buffer = ""
                return self._call_events(*call)
            self._phase = _TEXT
        return self._scan(final=True)

    def _call_events(self, name: str, arguments: dict[str, Any]) -> list[Event]:
        index = self._index
        self._index += 1
        return [
            ("tool_call", index, name),
            ("arguments", index, json.dumps(arguments)),
            ("tool_call_end", index),
        ]

    def _scan(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while True:
            if self._phase == _TEXT:
                start = self._buffer.find(TOOL_CALL_OPEN)
                if start < 0:
                    keep = 0 if final else _partial_tag_length(self._buffer, TOOL_CALL_OPEN)
                    start = len(self._buffer) - keep
                    text, self._buffer = self._buffer[:start], self._buffer[start:]
                    if text:
                        events.append(("text", text))
                    return events
                if start > 0:
                    events.append(("text", self._buffer[:start]))
                self._buffer = self._buffer[start + len(TOOL_CALL_OPEN) :]
                self._phase = _BLOCK
                continue
            end = self._buffer.find(TOOL_CALL_CLOSE)
            if end < 0 and not final:
                return events
            inner = self._buffer if end < 0 else self._buffer[:end]
            self._buffer = "" if end < 0 else self._buffer[end + len(TOOL_CALL_CLOSE) :]
            self._phase = _TEXT
            call = _as_call(inner)
            if call is not None:
                events.extend(self._call_events(*call))
            else:
                closing = "" if end < 0 else TOOL_CALL_CLOSE
                events.append(("text", TOOL_CALL_OPEN + inner + closing))


class ForcedToolCallStream:
    """Events for a call forced through `ToolCallConstraint`, fed each accepted piece."""

    def __init__(self, constraint: ToolCallConstraint) -> None:
        self._constraint = constraint
        self._started = False
        self._sent = 0
        self._ended = False

    def feed(self, piece: str) -> list[Event]:
        # The constraint already holds `piece`; its state says what is new since last time.
        constraint = self._constraint
        events: list[Event] = []
        if constraint.name is not None and not self._started:
            self._started = True
            events.append(("tool_call", 0, constraint.name))
        delta = constraint.arguments_text[self._sent :]
        if delta:
            self._sent += len(delta)
            events.append(("arguments", 0, delta))
        if constraint.complete and not self._ended:
            self._ended = True
            events.append(("tool_call_end", 0))
        return events


_CALL_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id(prefix: str = "call_") -> str:
    return prefix + "".join(secrets.choice(_CALL_ID_ALPHABET) for _ in range(24))
