"""JSON-Schema-guided decoding: generated text can only be an instance of a schema.

Owns `SchemaConstraint`, the generator's `Constraint` protocol for a JSON Schema, and
`SchemaScanner`, the incremental pushdown automaton behind it. The schema is compiled
once into nodes; the scanner's state is a tuple of immutable frame stacks (a stack is a
linked tuple `(mode, node, data, parent)`), so `copy` shares everything and testing a
candidate piece allocates only the frames it changes.

The subset covered is what tool parameters use (JSON Schema 2020-12 names):
`type` (a name or a list), object `properties` / `required` / `additionalProperties`
(absent means false when `properties` is given, any key when not), array `items` /
`prefixItems` / `minItems` / `maxItems`, string `enum` / `minLength` / `maxLength`,
`number`, `integer`, `boolean`, `null`, `enum` / `const` of any JSON values, `anyOf` /
`oneOf` (both as a union), `allOf` (merged), `$ref` into the same document, and
`{}` / `true` for any value. Every other keyword is ignored, never refused: the scanner
then accepts a superset of the schema's instances. Free strings are capped at
`max_string_length` characters, since a tiny model inside a string may never close it.

Imports only the standard library: never jax or numpy, so API processes stay light.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Frame modes. Between tokens, where whitespace may appear (RFC 8259 section 2):
_VALUE, _OBJECT_FIRST, _OBJECT_KEY, _OBJECT_COLON, _OBJECT_NEXT, _ARRAY_FIRST, _ARRAY_NEXT, _DONE = range(8)
# Inside a token. Whitespace in the four string modes is text, not a run to limit.
_KEY, _FREE_KEY, _STRING, _ENUM_STRING, _NUMBER, _LITERAL = range(8, 14)
_IN_STRING = frozenset({_KEY, _FREE_KEY, _STRING, _ENUM_STRING})

_WHITESPACE = frozenset(" \t\n\r")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_SIMPLE_ESCAPES = frozenset('"\\/bfnrt')
# Characters a free string takes one for one: no quote, backslash or control character.
_PLAIN_RUN = re.compile(r'[^"\\\x00-\x1f]*')

# String lexing state: 0 plain, 1 after a backslash, k >= 2: k - 1 hex digits of \u left.
_CLOSED, _REJECTED = -1, -2

# Number grammar (RFC 8259 section 6), as in swarm.tool_calls.JsonScanner; kept here so
# this module depends on nothing. Character classes: "0", "1" (1-9), ".", "e" (eE), "+" (+-).
_MINUS, _ZERO, _INTEGER, _DOT, _FRACTION, _EXPONENT, _EXPONENT_SIGN, _EXPONENT_DIGITS = range(8)
_NUMBER_ENDS = frozenset({_ZERO, _INTEGER, _FRACTION, _EXPONENT_DIGITS})
_NUMBER_CLASSES = dict(zip("0123456789.eE+-", "0111111111.ee++", strict=True))
_NUMBER_TRANSITIONS: tuple[dict[str, int], ...] = (
    {"0": _ZERO, "1": _INTEGER},  # _MINUS
    {".": _DOT, "e": _EXPONENT},  # _ZERO: no more digits, "01" is not a number
    {"0": _INTEGER, "1": _INTEGER, ".": _DOT, "e": _EXPONENT},  # _INTEGER
    {"0": _FRACTION, "1": _FRACTION},  # _DOT
    {"0": _FRACTION, "1": _FRACTION, "e": _EXPONENT},  # _FRACTION
    {"+": _EXPONENT_SIGN, "0": _EXPONENT_DIGITS, "1": _EXPONENT_DIGITS},  # _EXPONENT
    {"0": _EXPONENT_DIGITS, "1": _EXPONENT_DIGITS},  # _EXPONENT_SIGN
    {"0": _EXPONENT_DIGITS, "1": _EXPONENT_DIGITS},  # _EXPONENT_DIGITS
)

Frame = tuple[Any, ...]  # (mode, node, data, parent frame); the bottom frame is _DONE_FRAME
_DONE_FRAME: Frame = (_DONE, None, None, None)
_NO_KEYS: frozenset[str] = frozenset()


def _string_step(escape: int, character: str) -> int:
    """The lexing state after `character` inside a JSON string (section 7)."""
    if escape == 0:
        if character == '"':
            return _CLOSED
        if character == "\\":
            return 1
        return _REJECTED if character < " " else 0
    if escape == 1:
        if character == "u":
            return 5
        return 0 if character in _SIMPLE_ESCAPES else _REJECTED
    if character not in _HEX_DIGITS:
        return _REJECTED
    return escape - 1 if escape > 2 else 0


def _prefixes(texts: set[str]) -> frozenset[str]:
    return frozenset(text[:end] for text in texts for end in range(1, len(text) + 1))


# Compiled schema nodes. Frames refer to them by identity; `start` opens a value of the
# node's kind, whose first character `_Value.by_first` already matched.


@dataclass(eq=False)
class _Value:
    """Any of several alternatives, by the first character each can start with.

    A union may include another `_Value` that is still being compiled (a recursive
    `$ref`): `includes` keeps it, and `_Compiler.finish` copies its alternatives in.
    """

    by_first: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    includes: list[_Value] = field(default_factory=list)

    def add(self, node: Any) -> bool:
        """Include `node`'s alternatives; whether any was new."""
        if isinstance(node, _Value):
            if node not in self.includes:
                self.includes.append(node)
            alternatives = [(first, option) for first, options in node.by_first.items() for option in options]
        else:
            alternatives = [(first, node) for first in node.first_characters]
        added = False
        for first, option in alternatives:
            if option not in self.by_first.get(first, ()):
                self.by_first[first] = (*self.by_first.get(first, ()), option)
                added = True
        return added


@dataclass(eq=False)
class _Object:
    names: dict[str, _Value]  # the declared properties a value can be given for
    required: frozenset[str]
    additional: _Value | None  # the schema of undeclared keys; None: no undeclared keys
    max_key_length: int  # for undeclared keys
    keys: dict[str, str] = field(init=False)  # a declared key as JSON text -> its name
    key_prefixes: dict[str, tuple[str, ...]] = field(init=False)  # JSON text prefix -> names
    first_characters = "{"

    def __post_init__(self) -> None:
        self.keys, self.key_prefixes = {}, {}
        for name in self.names:
            for text in {json.dumps(name, ensure_ascii=False), json.dumps(name)}:
                self.keys[text] = name
                for end in range(1, len(text) + 1):
                    names = self.key_prefixes.get(text[:end], ())
                    if name not in names:
                        self.key_prefixes[text[:end]] = (*names, name)

    def start(self, character: str, parent: Frame) -> Frame | None:
        return (_OBJECT_FIRST, self, _NO_KEYS, parent)


@dataclass(eq=False)
class _Array:
    prefix: tuple[_Value, ...]  # schemas of the first items, in order
    items: _Value | None  # the schema of items after those; None: no more items
    min_items: int
    max_items: float
    first_characters = "["

    def item(self, index: int) -> _Value:
        return self.prefix[index] if index < len(self.prefix) else self.items  # type: ignore[return-value]

    def start(self, character: str, parent: Frame) -> Frame | None:
        return (_ARRAY_FIRST, self, 0, parent)


@dataclass(eq=False)
class _String:
    min_length: int
    max_length: float
    first_characters = '"'

    def start(self, character: str, parent: Frame) -> Frame | None:
        return (_STRING, self, (0, 0), parent)


@dataclass(eq=False)
class _EnumString:
    full: frozenset[str]  # each allowed string as JSON text, quotes included
    prefixes: frozenset[str] = field(init=False)
    first_characters = '"'

    def __post_init__(self) -> None:
        self.prefixes = _prefixes(set(self.full))

    def start(self, character: str, parent: Frame) -> Frame | None:
        return (_ENUM_STRING, self, '"', parent)


@dataclass(eq=False)
class _Number:
    integer: bool  # no fraction or exponent
    texts: frozenset[str] | None = None  # the allowed numbers as JSON text; None: any
    prefixes: frozenset[str] = field(init=False)
    first_characters: str = field(init=False)

    def __post_init__(self) -> None:
        self.prefixes = _prefixes(set(self.texts or ()))
        self.first_characters = "".join({text[0] for text in self.texts}) if self.texts else "-0123456789"

    def start(self, character: str, parent: Frame) -> Frame | None:
        if self.texts is not None and character not in self.prefixes:
            return None
        mode = _MINUS if character == "-" else _ZERO if character == "0" else _INTEGER
        return (_NUMBER, self, (mode, character), parent)


@dataclass(eq=False)
class _Literal:
    text: str  # true, false or null
    first_characters: str = field(init=False)

    def __post_init__(self) -> None:
        self.first_characters = self.text[0]

    def start(self, character: str, parent: Frame) -> Frame | None:
        return (_LITERAL, self, self.text[1:], parent)


_TYPE_KEYWORDS = {
    "object": ("properties", "required", "additionalProperties"),
    "array": ("items", "prefixItems", "minItems", "maxItems"),
    "string": ("minLength", "maxLength"),
}


# Keywords that say nothing about which values are valid, or that a union handles itself.
_NOT_CONSTRAINTS = frozenset(
    {"anyOf", "oneOf", "title", "description", "default", "examples", "$comment", "deprecated"}
)
_MAX_DEPTH = 64


def _count(schema: Mapping[str, Any], keyword: str, default: float) -> float:
    value = schema.get(keyword)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


class _Compiler:
    """JSON Schema -> nodes. Lenient: what it does not know it reads as "any value"."""

    def __init__(self, root: Any, max_string_length: int) -> None:
        self.root = root
        self.max_string_length = max_string_length
        self.refs: dict[str, _Value] = {}
        self.depth = 0
        self.values: list[_Value] = []
        self.any = self.new_value()
        self.any.add(_Object({}, _NO_KEYS, self.any, max(1, max_string_length)))
        self.any.add(_Array((), self.any, 0, math.inf))
        self.any.add(_String(0, max_string_length))
        self.any.add(_Number(integer=False))
        for text in ("true", "false", "null"):
            self.any.add(_Literal(text))

    def value(self, schema: Any) -> _Value:
        if schema is False:
            return self.new_value()
        if not isinstance(schema, Mapping) or not schema or self.depth > _MAX_DEPTH:
            return self.any  # nesting this deep comes only from a schema that contains itself
        if isinstance(schema.get("$ref"), str):
            return self.reference(schema["$ref"])
        self.depth += 1
        try:
            return self.unreferenced(self.merged(schema))
        finally:
            self.depth -= 1

    def unreferenced(self, schema: Mapping[str, Any]) -> _Value:
        for keyword in ("anyOf", "oneOf"):
            options = schema.get(keyword)
            if isinstance(options, list) and options:
                # Keywords beside anyOf hold for every alternative, e.g. shared properties.
                rest = {key: item for key, item in schema.items() if key not in _NOT_CONSTRAINTS}
                union = self.new_value()
                for option in options:
                    union.add(self.value({"allOf": [rest, option]} if rest else option))
                return union
        union = self.new_value()
        if "const" in schema or isinstance(schema.get("enum"), list):
            for node in self.constants([schema["const"]] if "const" in schema else schema["enum"]):
                union.add(node)
            return union
        types = schema.get("type")
        if isinstance(types, str):
            types = [types]
        if not isinstance(types, list):
            types = [name for name, keywords in _TYPE_KEYWORDS.items() if any(k in schema for k in keywords)]
            if not types:
                return self.any
        if schema.get("nullable") is True:  # OpenAPI's spelling of ["...", "null"]
            types = [*types, "null"]
        for name in types:
            for node in self.typed(name, schema):
                union.add(node)
        return union if union.by_first else self.any

    def new_value(self) -> _Value:
        self.values.append(_Value())
        return self.values[-1]

    def finish(self) -> None:
        """Complete every union with what its includes gained after it took them in."""
        changed = True
        while changed:
            changed = False
            for value in self.values:
                for included in value.includes:
                    changed |= value.add(included)

    def reference(self, ref: str) -> _Value:
        if ref in self.refs:
            return self.refs[ref]
        # Registered before compiling its target, so a recursive schema refers to itself.
        placeholder = self.refs[ref] = self.new_value()
        target = self.resolve(ref)
        placeholder.add(self.value(target) if target is not None else self.any)
        return placeholder

    def resolve(self, ref: str) -> Any:
        """The schema a `#/...` JSON pointer (RFC 6901) names in the root, or None."""
        if not ref.startswith("#"):
            return None
        target = self.root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, Mapping) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                return None
        return target

    def merged(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        """`schema` with its `allOf` parts folded in: properties joined, required united."""
        parts = schema.get("allOf")
        if not isinstance(parts, list):
            return schema
        result = {key: item for key, item in schema.items() if key != "allOf"}
        if self.depth > _MAX_DEPTH:
            return result
        self.depth += 1
        try:
            for part in parts:
                self.merge_into(result, part)
        finally:
            self.depth -= 1
        return result

    def merge_into(self, result: dict[str, Any], part: Any) -> None:
        seen: set[str] = set()
        while isinstance(part, Mapping) and isinstance(part.get("$ref"), str) and part["$ref"] not in seen:
            seen.add(part["$ref"])
            part = self.resolve(part["$ref"])
        if not isinstance(part, Mapping):
            return
        for key, item in self.merged(part).items():
            if key == "properties" and isinstance(item, Mapping):
                result[key] = {**result.get(key, {}), **item}
            elif key == "required" and isinstance(item, list):
                result[key] = [*result.get(key, []), *item]
            else:
                result.setdefault(key, item)

    def constants(self, values: list[Any]) -> list[Any]:
        strings = {json.dumps(v, ensure_ascii=False) for v in values if isinstance(v, str)}
        strings |= {json.dumps(v) for v in values if isinstance(v, str)}
        numbers: set[str] = set()
        for value in values:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                numbers.add(json.dumps(value))
                if value == int(value):  # 2 and 2.0 are the same JSON Schema value
                    numbers |= {str(int(value)), f"{int(value)}.0"}
        nodes: list[Any] = [_EnumString(frozenset(strings))] if strings else []
        if numbers:
            nodes.append(_Number(integer=False, texts=frozenset(numbers)))
        literals = {json.dumps(v) for v in values if v is None or isinstance(v, bool)}
        nodes.extend(_Literal(text) for text in sorted(literals))
        for value in values:
            if isinstance(value, dict):
                nodes.append(
                    self.value(
                        {
                            "type": "object",
                            "properties": {key: {"const": item} for key, item in value.items()},
                            "required": list(value),
                        }
                    )
                )
            elif isinstance(value, list):
                items = [{"const": item} for item in value]
                nodes.append(
                    self.value(
                        {"type": "array", "prefixItems": items, "items": False, "minItems": len(items)}
                    )
                )
        return nodes

    def typed(self, name: str, schema: Mapping[str, Any]) -> list[Any]:
        if name == "object":
            return [self.object(schema)]
        if name == "array":
            return [self.array(schema)]
        if name == "string":
            minimum = int(_count(schema, "minLength", 0))
            return [_String(minimum, _count(schema, "maxLength", max(self.max_string_length, minimum)))]
        if name in ("number", "integer"):
            return [_Number(integer=name == "integer")]
        if name == "boolean":
            return [_Literal("true"), _Literal("false")]
        if name == "null":
            return [_Literal("null")]
        return []

    def object(self, schema: Mapping[str, Any]) -> _Object:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, Mapping) else None
        extra = schema.get("additionalProperties", properties is None)
        additional = None if extra is False else self.value(extra)
        names = {}
        for name, item in (properties or {}).items():
            if item is not False:  # a property whose schema is false may not be given
                names[name] = self.value(item)
        listed = schema.get("required")
        required = {name for name in listed if isinstance(name, str)} if isinstance(listed, list) else set()
        if additional is None:
            for name in required - names.keys():
                if (properties or {}).get(name, True) is not False:
                    names[name] = self.any  # required, though not declared: any value
            required &= names.keys()  # a required key whose schema is false cannot be met
        # Undeclared keys are capped like free strings, but never below a declared name
        # (typed through the same path) nor at 0, where a second key could only repeat "".
        key_length = max([1, self.max_string_length, *(len(json.dumps(name)) for name in names)])
        return _Object(names, frozenset(required), additional, key_length)

    def array(self, schema: Mapping[str, Any]) -> _Array:
        prefix, rest = schema.get("prefixItems"), schema.get("items", True)
        if isinstance(rest, list):  # draft 4-2019 spelling of prefixItems
            prefix, rest = rest, schema.get("additionalItems", True)
        prefix_nodes = tuple(self.value(item) for item in prefix) if isinstance(prefix, list) else ()
        items = None if rest is False else self.value(rest)
        max_items = _count(schema, "maxItems", math.inf)
        if items is None:
            max_items = min(max_items, len(prefix_nodes))
        return _Array(prefix_nodes, items, int(_count(schema, "minItems", 0)), max_items)


def _start(value: _Value, character: str, parent: Frame) -> tuple[Frame, ...]:
    options = value.by_first.get(character)
    if options is None:
        return ()
    frames = (option.start(character, parent) for option in options)
    return tuple(frame for frame in frames if frame is not None)


def _step(frame: Frame, character: str) -> tuple[Frame, ...]:
    """The frames `frame` may become on `character`: none if refused, several for a union."""
    mode, node, data, parent = frame
    if mode == _STRING:
        length, previous = data
        escape = _string_step(previous, character)
        if escape == _CLOSED:
            return (parent,) if length >= node.min_length else ()
        if escape == _REJECTED:
            return ()
        # A character counts at its start, so an escape begun within maxLength can end.
        # Each \u escape counts one: a surrogate pair written so counts two, never too few.
        if previous == 0:
            length += 1
            if length > node.max_length:
                return ()
        return ((_STRING, node, (length, escape), parent),)
    if mode == _KEY:
        seen, text = data
        text += character
        names = node.key_prefixes.get(text)
        if names is None or all(name in seen for name in names):
            return ()
        name = node.keys.get(text)
        if name is not None:
            return ((_OBJECT_COLON, node, (seen | {name}, node.names[name]), parent),)
        return ((_KEY, node, (seen, text), parent),)
    if mode == _ENUM_STRING:
        text = data + character
        if text in node.full:
            return (parent,)
        return ((_ENUM_STRING, node, text, parent),) if text in node.prefixes else ()
    if mode == _NUMBER:
        return _number_step(frame, character)
    if mode == _FREE_KEY:
        seen, text, length, previous = data
        escape = _string_step(previous, character)
        text += character
        if escape == _REJECTED:
            return ()
        if escape != _CLOSED:
            length += previous == 0  # counted as in _STRING
            if length > node.max_key_length:
                return ()
            # At the cap only the closing quote may follow: it must not repeat a key.
            if length == node.max_key_length and escape == 0 and json.loads(text + '"') in seen:
                return ()
            return ((_FREE_KEY, node, (seen, text, length, escape), parent),)
        name = json.loads(text)
        if name in seen:
            return ()
        return ((_OBJECT_COLON, node, (seen | {name}, node.names.get(name, node.additional)), parent),)
    if mode == _LITERAL:
        if character != data[0]:
            return ()
        return ((_LITERAL, node, data[1:], parent),) if len(data) > 1 else (parent,)
    if mode == _DONE:
        return ()
    if character in _WHITESPACE:
        return (frame,)
    if mode == _VALUE:
        return _start(node, character, parent)
    if mode == _OBJECT_NEXT:
        if character == ",":
            more = node.additional is not None or len(data) < len(node.names)
            return ((_OBJECT_KEY, node, data, parent),) if more else ()
        return (parent,) if character == "}" and node.required <= data else ()
    if mode == _OBJECT_COLON:
        seen, value = data
        return ((_VALUE, value, None, (_OBJECT_NEXT, node, seen, parent)),) if character == ":" else ()
    if mode in (_OBJECT_FIRST, _OBJECT_KEY):
        if character == '"':
            if node.additional is not None:
                return ((_FREE_KEY, node, (data, '"', 0, 0), parent),)
            return ((_KEY, node, (data, '"'), parent),) if len(data) < len(node.names) else ()
        if character == "}" and mode == _OBJECT_FIRST and not node.required:
            return (parent,)
        return ()
    if mode == _ARRAY_NEXT:
        if character == ",":
            if data >= node.max_items:
                return ()
            return ((_VALUE, node.item(data), None, (_ARRAY_NEXT, node, data + 1, parent)),)
        return (parent,) if character == "]" and data >= node.min_items else ()
    # _ARRAY_FIRST
    if character == "]":
        return (parent,) if node.min_items == 0 else ()
    if node.max_items == 0:
        return ()
    return _start(node.item(0), character, (_ARRAY_NEXT, node, 1, parent))


def _number_step(frame: Frame, character: str) -> tuple[Frame, ...]:
    _, node, (mode, text), parent = frame
    kind = _NUMBER_CLASSES.get(character)
    if kind is not None and not (node.integer and kind in ".e"):
        next_mode = _NUMBER_TRANSITIONS[mode].get(kind)
        if next_mode is not None:
            if node.texts is None:
                return ((_NUMBER, node, (next_mode, ""), parent),)  # any number: no text to keep
            if text + character in node.prefixes:
                return ((_NUMBER, node, (next_mode, text + character), parent),)
    # A number ends only at a character it cannot take; that one belongs to what follows.
    if mode in _NUMBER_ENDS and (node.texts is None or text in node.texts):
        return _step(parent, character)
    return ()


def _finished(frame: Frame) -> bool:
    if frame[0] == _DONE:
        return True
    if frame[0] != _NUMBER or frame[3][0] != _DONE:
        return False
    mode, text = frame[2]
    return mode in _NUMBER_ENDS and (frame[1].texts is None or text in frame[1].texts)


class SchemaScanner:
    """Is the text fed so far a prefix of a JSON instance of the schema?

    `object_only` keeps only the object alternatives of the top-level schema (a tool's
    arguments), falling back to any object if it has none. `max_whitespace_run` refuses
    longer runs of whitespace outside strings.
    """

    __slots__ = ("_frames", "_max_whitespace_run", "_whitespace_run")

    def __init__(
        self,
        schema: Any,
        max_whitespace_run: int | None = None,
        max_string_length: int = 256,
        object_only: bool = False,
    ) -> None:
        compiler = _Compiler(schema, max_string_length)
        root = compiler.value(schema)
        compiler.finish()
        if object_only:
            objects = root.by_first.get("{", ())
            root = _Value({"{": objects}) if objects else _Value({"{": compiler.any.by_first["{"]})
        self._frames: tuple[Frame, ...] = ((_VALUE, root, None, _DONE_FRAME),)
        self._max_whitespace_run = max_whitespace_run
        self._whitespace_run = 0

    def copy(self) -> SchemaScanner:
        other = SchemaScanner.__new__(SchemaScanner)
        # Every field is immutable (frames are tuples over shared nodes), so this is a full copy.
        other._frames = self._frames
        other._max_whitespace_run = self._max_whitespace_run
        other._whitespace_run = self._whitespace_run
        return other

    @property
    def complete(self) -> bool:
        """A whole instance has been read (a top-level number is whole but may still grow)."""
        return any(_finished(frame) for frame in self._frames)

    def feed(self, text: str) -> bool:
        """Consume `text`; False (and stays False) once no instance can start with the text."""
        frames, run, limit = self._frames, self._whitespace_run, self._max_whitespace_run
        index, end = 0, len(text)
        while index < end and frames:
            if len(frames) == 1 and frames[0][0] == _STRING and frames[0][2][1] == 0:
                # Inside a plain stretch of a free string, take the whole run at once.
                stop = _PLAIN_RUN.match(text, index).end()  # type: ignore[union-attr]
                if stop > index:
                    _, node, (length, _), parent = frames[0]
                    length += stop - index
                    frames = ((_STRING, node, (length, 0), parent),) if length <= node.max_length else ()
                    index, run = stop, 0
                    continue
            character = text[index]
            index += 1
            if character in _WHITESPACE and frames[0][0] not in _IN_STRING:
                run += 1
                if limit is not None and run > limit:
                    frames = ()
                    break
            else:
                run = 0
            if len(frames) == 1:
                frames = _step(frames[0], character)
            else:  # several readings of a union: keep each distinct one that survives
                frames = tuple(dict.fromkeys(new for frame in frames for new in _step(frame, character)))
        self._frames, self._whitespace_run = frames, run
        return bool(frames)


class SchemaConstraint:
    """Output is one JSON instance of `schema` (`response_format: json_schema`)."""

    def __init__(self, schema: Any, max_whitespace_run: int = 4, max_string_length: int = 256) -> None:
        # Tiny models loop on newlines when whitespace is free; a short run is all JSON needs.
        self._scanner = SchemaScanner(schema, max_whitespace_run, max_string_length)
        self._complete = False
        # The generator tries hundreds of pieces per token and most fail on their first
        # character: the scanner after each first character is worked out once per token.
        self._after_first: dict[str, SchemaScanner | None] = {}

    def accepts(self, piece: str) -> bool:
        # An empty piece would let the generator pick a token that changes nothing, forever.
        if not piece or self._complete:
            return False
        first = piece[0]
        if first in self._after_first:
            after = self._after_first[first]
        else:
            after = self._scanner.copy()
            if not after.feed(first):
                after = None
            self._after_first[first] = after
        if after is None:
            return False
        return len(piece) == 1 or after.copy().feed(piece[1:])

    def advance(self, piece: str) -> None:
        if not self.accepts(piece):
            raise ValueError(f"piece {piece!r} was not accepted")
        self._scanner.feed(piece)
        self._complete = self._scanner.complete
        self._after_first.clear()

    @property
    def complete(self) -> bool:
        return self._complete
