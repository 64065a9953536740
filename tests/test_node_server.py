"""The node socket refuses malformed frames with a clear error and keeps serving."""

from __future__ import annotations

import json
import socket

import pytest


def exchange(path, raw: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(5)
        connection.connect(str(path))
        connection.sendall(raw)
        return json.loads(connection.makefile("rb").readline())


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"not json\n", "malformed message"),
        (b"[1, 2]\n", "must be a JSON object"),
        (b'{"op": "launch"}\n', "unknown op"),
        (b'{"op": "generate", "request": {"model": "mock-1"}}\n', "exactly one of messages and prompt"),
        (b'{"op": "generate", "request": {"prompt": "x", "sampling": {"top_p": 7}}}\n', "top_p"),
        (b'{"op": "embed", "model": "mock-1", "inputs": []}\n', "inputs"),
        (b'{"op": "generate", "request": {"prompt": "x", "priority": 1000}}\n', "priority"),
        (b'{"op": "generate", "request": {"prompt": "x", "priority": "high"}}\n', "priority"),
    ],
)
def test_bad_frames_get_a_named_error_and_the_node_keeps_serving(node_server, raw, words):
    answer = exchange(node_server.path, raw)
    assert answer["event"] == "error" and answer["code"] == "invalid_request" and words in answer["message"]
    assert exchange(node_server.path, b'{"op": "health"}\n')["state"] == "ready"
