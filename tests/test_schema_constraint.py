"""JSON-Schema-guided constraints: instances accepted split anywhere, non-instances refused.

Soundness is checked against an outside oracle, the `jsonschema` validator (installed
with the `mcp` dev dependency): text the constraint lets a random walk complete must be
valid for the schema.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.schema_constraint import SchemaConstraint, SchemaScanner

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
        "detailed": {"type": "boolean"},
    },
    "required": ["city"],
}
PERSON = {
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "zip": {"type": "string", "maxLength": 10}},
            "required": ["street"],
        }
    },
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": ["integer", "null"]},
        "address": {"$ref": "#/$defs/address"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "address"],
}
TREE = {
    "definitions": {
        "node": {
            "type": "object",
            "properties": {
                "value": {"type": "number"},
                "children": {"type": "array", "items": {"$ref": "#/definitions/node"}},
            },
            "required": ["value"],
        }
    },
    "$ref": "#/definitions/node",
}
SHAPE = {
    "anyOf": [
        {
            "type": "object",
            "properties": {"kind": {"const": "circle"}, "radius": {"type": "number"}},
            "required": ["kind", "radius"],
        },
        {
            "type": "object",
            "properties": {"kind": {"const": "square"}, "side": {"type": "number"}},
            "required": ["kind", "side"],
        },
    ]
}
MIXED_ENUM = {"enum": [1, 2.5, "a", 'é"', None, True, {"k": [1, "x"]}, [1, "x"]]}
SCORES = {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}
ANY_OBJECT = {"type": "object"}

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


# maxLength counts each \u escape as one character, so a surrogate pair written as escapes
# (ensure_ascii) counts two: stricter than code points. Strings under a maxLength stay in the BMP.
def bmp_text(max_size: int) -> st.SearchStrategy[str]:
    return st.text(st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"]), max_size=max_size)


numbers = st.integers(min_value=-(10**20), max_value=10**20) | st.floats(
    allow_nan=False, allow_infinity=False
)


def objects(required: dict[str, Any], optional: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with every required key, some optional ones, keys in any order."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        extra = draw(st.lists(st.sampled_from(sorted(optional)), unique=True)) if optional else []
        keys = [*required, *extra]
        strategies = {**required, **optional}
        return {key: draw(strategies[key]) for key in draw(st.permutations(keys))}

    return build()


addresses = objects({"street": st.text(max_size=12)}, {"zip": bmp_text(10)})
trees = st.recursive(
    objects({"value": numbers}, {}),
    lambda children: objects({"value": numbers}, {"children": st.lists(children, max_size=3)}),
    max_leaves=6,
)
INSTANCES = {
    "weather": (
        WEATHER,
        objects(
            {"city": bmp_text(20)},
            {
                "unit": st.sampled_from(["celsius", "fahrenheit"]),
                "days": st.integers(),
                "detailed": st.booleans(),
            },
        ),
    ),
    "person": (
        PERSON,
        objects(
            {"name": st.text(max_size=16), "address": addresses},
            {"age": st.none() | st.integers(0, 150), "tags": st.lists(st.text(max_size=6), max_size=3)},
        ),
    ),
    "tree": (TREE, trees),
    "shape": (
        SHAPE,
        objects({"kind": st.just("circle"), "radius": numbers}, {})
        | objects({"kind": st.just("square"), "side": numbers}, {}),
    ),
    "mixed_enum": (MIXED_ENUM, st.sampled_from(MIXED_ENUM["enum"])),
    "scores": (SCORES, st.lists(st.integers(), min_size=1, max_size=3)),
    "any_object": (ANY_OBJECT, st.dictionaries(st.text(max_size=6), json_values, max_size=4)),
}


def accepts_all(constraint: SchemaConstraint, *pieces: str) -> bool:
    for piece in pieces:
        if not constraint.accepts(piece):
            return False
        constraint.advance(piece)
    return True


def accepted_whole(schema: Any, text: str, **options: Any) -> bool:
    constraint = SchemaConstraint(schema, **options)
    return accepts_all(constraint, text) and constraint.complete


@pytest.mark.parametrize("case", sorted(INSTANCES))
@settings(max_examples=25, deadline=None)
@given(data=st.data(), spaced=st.booleans(), ensure_ascii=st.booleans())
def test_instances_are_accepted_split_anywhere(
    case: str, data: st.DataObject, spaced: bool, ensure_ascii: bool
) -> None:
    schema, strategy = INSTANCES[case]
    value = data.draw(strategy)
    separators = (", ", ": ") if spaced else (",", ":")
    text = json.dumps(value, separators=separators, ensure_ascii=ensure_ascii)
    jsonschema.validate(value, schema)  # the strategy itself is right
    for cut in range(len(text)):
        constraint = SchemaConstraint(schema)
        assert accepts_all(constraint, text[:cut]) if cut else True, (text, cut)
        if isinstance(value, (dict, list)):
            assert not constraint.complete, (text, cut)
        assert accepts_all(constraint, text[cut:]), (text, cut)
        assert constraint.complete, text
        assert not constraint.accepts(" ") and not constraint.accepts("}"), "nothing may follow"
    # One character at a time lands where whole pieces do.
    scanner = SchemaScanner(schema)
    assert all(scanner.feed(character) for character in text) and scanner.complete


@pytest.mark.parametrize("case", ["weather", "person", "tree", "any_object"])
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_indented_instances_are_accepted_when_whitespace_is_free(case: str, data: st.DataObject) -> None:
    schema, strategy = INSTANCES[case]
    text = json.dumps(data.draw(strategy), indent=2)
    assert accepted_whole(schema, text, max_whitespace_run=1000)


@pytest.mark.parametrize(
    ("schema", "text"),
    [
        (WEATHER, '{"town"'),  # a key the schema does not declare
        (WEATHER, '{"cit":'),
        (WEATHER, '{"city": "Paris", "extra"'),  # additionalProperties absent: false
        ({**WEATHER, "additionalProperties": False}, '{"city": "x", "c'),
        (WEATHER, '{"unit": "celsius"}'),  # the required city is missing at the close
        (WEATHER, "{}"),
        (WEATHER, '{"city": "a", "city"'),  # a key twice
        (WEATHER, '{"city": 1'),  # wrong types
        (WEATHER, '{"days": "3"'),
        (WEATHER, '{"days": 1.5'),
        (WEATHER, '{"days": 1e5'),
        (WEATHER, '{"detailed": null'),
        (WEATHER, '{"unit": "kelvin"'),  # not in the enum
        (WEATHER, '{"unit": "Celsius"'),
        (WEATHER, '{"city": "' + "x" * 21),  # maxLength 20
        (WEATHER, '["Paris"'),
        (WEATHER, '{"city": "a"} '),  # nothing after a whole value
        (PERSON, '{"name": "a", "tags": ["a", "b", "c",'),  # maxItems 3
        (PERSON, '{"name": "a", "address": {}'),  # nested required key
        (PERSON, '{"name": "a", "address": {"street": "s", "city"'),
        (PERSON, '{"age": 1.5'),
        (PERSON, '{"age": "1"'),
        (TREE, '{"value": 1, "children": [{"children": []}'),
        (TREE, '{"value": 1, "children": [{"value": "x"'),
        (SHAPE, '{"kind": "circle", "side"'),  # the other alternative's key
        (SHAPE, '{"kind": "triangle"'),
        (SHAPE, '{"kind": "square"}'),
        (MIXED_ENUM, "3"),
        (MIXED_ENUM, '{"k": [1]}'),
        (MIXED_ENUM, "[1, 2"),
        (MIXED_ENUM, "false"),
        (SCORES, "[]"),  # minItems 1
        (SCORES, "[1, 2, 3, "),
        (ANY_OBJECT, '{"a": 1, "a"'),  # duplicate keys are refused for free keys too
        ({"type": "object", "properties": {}}, '{"'),  # declared: no properties at all
    ],
)
def test_non_instances_are_refused(schema: Any, text: str) -> None:
    assert not SchemaConstraint(schema).accepts(text)
    scanner = SchemaScanner(schema)
    assert not (all(scanner.feed(character) for character in text) and scanner.complete)
    with contextlib.suppress(ValueError):  # where the text is whole JSON, the oracle agrees
        value = json.loads(text)
        if text == text.strip():
            assert not jsonschema.Draft202012Validator(schema).is_valid(value)


ORACLE_SCHEMAS = {
    "weather": WEATHER,
    "person": PERSON,
    "tree": TREE,
    "shape": SHAPE,
    "mixed_enum": MIXED_ENUM,
    "scores": SCORES,
    "nested_arrays": {
        "type": "array",
        "prefixItems": [{"type": "boolean"}, {"type": "null"}],
        "items": {"type": "array", "items": {"type": ["number", "string"]}, "maxItems": 2},
        "maxItems": 4,
    },
    "any_object": ANY_OBJECT,
    "extra_keys": {
        "type": "object",
        "properties": {"a": {"type": "boolean"}},
        "additionalProperties": {"type": "array", "items": {"type": "integer"}, "maxItems": 2},
        "required": ["a", "b"],
    },
    "all_of": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"properties": {"b": {"const": [1, {"c": None}]}}, "required": ["b"]},
        ]
    },
}
# Characters a walk may pick, closers first: hypothesis shrinks toward short, closed texts.
WALK_ALPHABET = '}]"0, :{[1-.e+ \\u9aAbcklrsquetfn/éxz\n'


@pytest.mark.parametrize("case", sorted(ORACLE_SCHEMAS))
@settings(max_examples=60, deadline=None)
@given(
    data=st.data(), max_string_length=st.sampled_from([0, 2, 6]), max_whitespace_run=st.sampled_from([0, 4])
)
def test_random_walks_never_stick_and_end_in_valid_instances(
    case: str, data: st.DataObject, max_string_length: int, max_whitespace_run: int
) -> None:
    """A walk over accepted characters always has a next one, and what completes is valid."""
    schema = ORACLE_SCHEMAS[case]
    alphabet = sorted(set(WALK_ALPHABET) | set(json.dumps(schema)), key=WALK_ALPHABET.find)
    alphabet = [c for c in WALK_ALPHABET if c in alphabet] + [c for c in alphabet if c not in WALK_ALPHABET]
    constraint = SchemaConstraint(schema, max_whitespace_run, max_string_length)
    text = ""
    for _ in range(120):
        if constraint.complete:
            break
        allowed = [character for character in alphabet if constraint.accepts(character)]
        assert allowed, f"stuck after {text!r}"
        character = data.draw(st.sampled_from(allowed))
        constraint.advance(character)
        text += character
    if constraint.complete:
        jsonschema.Draft202012Validator(schema).validate(json.loads(text))


def test_whitespace_runs_are_capped_outside_strings() -> None:
    constraint = SchemaConstraint(WEATHER)
    assert accepts_all(constraint, " \n", "{", " \t\n ")
    assert not constraint.accepts(" ")  # a run of five
    assert not SchemaConstraint(WEATHER).accepts("{\n\n\n\n\n")
    assert accepts_all(constraint, '"city"', " ", ":", "    ", '"', " " * 12, '"', "   ", "}")
    assert constraint.complete
    assert accepted_whole(WEATHER, '{ "city" :\n\n\n\n"a"\t}', max_whitespace_run=4)
    assert not accepted_whole(WEATHER, '{"days": 1     , "city": "a"}')  # after a number too


def test_free_strings_are_capped_unless_the_schema_says() -> None:
    assert accepted_whole({"type": "string"}, '"abcde"', max_string_length=5)
    assert not SchemaConstraint({"type": "string"}, max_string_length=5).accepts('"abcdef')
    assert accepted_whole({"type": "string", "maxLength": 8}, '"abcdefgh"', max_string_length=5)
    assert accepted_whole({"type": "string"}, '"\\u00e9\\n"', max_string_length=2)  # an escape is one
    assert not accepted_whole({"type": "string", "minLength": 2}, '"a"')
    assert not SchemaConstraint({"type": "string"}).accepts('"a\nb"')  # raw control character
    assert not SchemaConstraint({"type": "string"}).accepts('"\\x')
    # An escaped surrogate pair counts two (UTF-16 code units): stricter, never looser.
    assert not accepted_whole({"type": "string", "maxLength": 1}, '"\\ud83d\\ude00"')
    assert accepted_whole({"type": "string", "maxLength": 1}, '"\U0001f600"')


def test_key_length_caps_leave_no_dead_ends() -> None:
    declared = {
        "type": "object",
        "properties": {"a_long_name": {"type": "null"}},
        "additionalProperties": True,
        "required": ["a_long_name"],
    }
    assert accepted_whole(declared, '{"a_long_name": null, "ab": 1}', max_string_length=2)
    # Undeclared keys may then be as long as the longest declared one, as JSON text.
    assert accepted_whole(declared, '{"a_long_name": null, "' + "x" * 13 + '": 1}', max_string_length=2)
    assert not SchemaConstraint(declared, max_string_length=2).accepts('{"' + "x" * 14)
    constraint = SchemaConstraint(ANY_OBJECT, max_string_length=2)
    assert accepts_all(constraint, '{"ab": 1, "a')
    assert not constraint.accepts("b")  # "ab" at the cap could only close as a repeated key
    assert constraint.accepts("c")
    assert accepted_whole(ANY_OBJECT, '{"": 1, "a": 2}', max_string_length=0)


def test_recursive_references_through_unions() -> None:
    linked = {
        "$defs": {
            "item": {
                "type": "object",
                "properties": {"next": {"anyOf": [{"$ref": "#/$defs/item"}, {"type": "null"}]}},
                "required": ["next"],
            }
        },
        "$ref": "#/$defs/item",
    }
    assert accepted_whole(linked, '{"next": {"next": {"next": null}}}')
    assert not SchemaConstraint(linked).accepts('{"next": {"next": 1')
    assert not SchemaConstraint(linked).accepts('{"next": {}')
    # A reference to the root, escaped pointer parts.
    root = {"type": "array", "items": {"$ref": "#"}, "maxItems": 1}
    assert accepted_whole(root, "[[[]]]")
    assert not SchemaConstraint(root).accepts("[[], ")
    escaped = {"$defs": {"a/b~": {"type": "null"}}, "$ref": "#/$defs/a~1b~0"}
    assert accepted_whole(escaped, "null")


def test_schema_forms() -> None:
    assert accepted_whole({"properties": {"a": {"type": "integer"}}}, '{"a": 1}')  # object inferred
    assert accepted_whole({"type": "string", "nullable": True}, "null")
    assert accepted_whole({"type": "object", "properties": {"a": {}}, "required": ["b"]}, '{"b": [true]}')
    additional = {
        "type": "object",
        "properties": {"a": {"type": "null"}},
        "additionalProperties": {"type": "integer"},
    }
    assert accepted_whole(additional, '{"x": 1, "a": null, "y": 2}')
    assert not SchemaConstraint(additional).accepts('{"a": 1')  # a declared key keeps its schema
    assert not SchemaConstraint(additional).accepts('{"x": null')
    assert accepted_whole({"type": "object", "properties": {"a": False, "b": {}}}, '{"b": 1}')
    assert not SchemaConstraint({"type": "object", "properties": {"a": False}}).accepts('{"a')
    assert accepted_whole({"type": "integer"}, "-12")
    assert accepted_whole({"const": 2.0}, "2")
    assert accepted_whole({"oneOf": [{"type": "boolean"}, {"type": "string", "enum": ["x"]}]}, '"x"')
    assert accepted_whole({"type": "array", "items": False}, "[]")
    assert accepted_whole(True, '[{"a": null}, -1.5e-3, "\\ud83d\\ude00"]')


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "strange"},
        {"properties": 5},
        {"$ref": "https://example.com/schema"},
        {"$ref": "#/$defs/missing"},
        {"type": "string", "pattern": "^[a-z]+$", "format": "email"},
        {"type": "object", "required": "city"},
        {"anyOf": []},
        {"allOf": [{"$ref": "#"}]},
        {"items": [{"type": "integer"}], "additionalItems": False},
        {"minItems": -1, "maxLength": "x"},
        [],
    ],
)
def test_unsupported_or_odd_schemas_are_never_an_error(schema: Any) -> None:
    constraint = SchemaConstraint(schema)
    assert any(constraint.accepts(piece) for piece in ['"a"', "{}", "[1]", "1", "null"])
    # A reference that names only itself describes nothing; it compiles all the same.
    SchemaConstraint({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})


def test_advance_refuses_what_accepts_refuses() -> None:
    constraint = SchemaConstraint(WEATHER)
    assert not constraint.accepts("")
    with pytest.raises(ValueError, match="not accepted"):
        constraint.advance('{"x')
    assert accepts_all(constraint, '{"ci', 'ty": "a"}')
    with pytest.raises(ValueError, match="not accepted"):
        constraint.advance(" ")
