"""Models served elsewhere in the network, asked for through this node (swarm.delegation).

Two `swarm run` nodes on loopback, each serving a different model whole: `small`
(SmolLM2) and `gemma` (Gemma 3 270M, joined through small's DHT). Checked through
small's HTTP API: Gemma appears in /v1/models as a network model; a greedy chat for it
is Gemma's own answer, token for token and count for count, plain and streamed; token
counting and the Anthropic dialect reach it too; an unknown model is still a 404; gemma
is paid for the positions it ran, exactly; and gemma sees small's model the same way.
"""

from __future__ import annotations

import contextlib
import json
import time

import httpx2
import psutil
import pytest

from tests.live_node import LiveNode

pytestmark = [pytest.mark.integration, pytest.mark.realmodel]

NETWORK = "swarm-network-models-test"
GEMMA = "gemma3-270m"
SMOLLM2 = "smollm2-135m"
GEMMA_LAYERS = 18
QUESTION = "Name three colours of the rainbow."


@pytest.fixture(scope="module")
def nodes(data_dir, smollm2_path, gemma3_path):
    small = LiveNode(data_dir / "network" / "small", {}, NETWORK)
    small.start()
    gemma = LiveNode(
        data_dir / "network" / "gemma",
        {"SWARM_NETWORK_BOOTSTRAP_PEERS": f"127.0.0.1:{small.dht_port}"},
        NETWORK,
        model=GEMMA,
    )
    gemma.start()
    try:
        small.wait_ready(300)
        gemma.wait_ready(300)
        yield small, gemma
    finally:
        children = []
        for node in (small, gemma):
            with contextlib.suppress(psutil.NoSuchProcess):
                children += psutil.Process(node.process.pid).children(recursive=True)
        codes = [node.stop() for node in (small, gemma)]
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"processes left behind: {alive}"
        assert codes == [0, 0], small.log.read_text()[-2000:]


def _models(node: LiveNode) -> dict[str, dict]:
    return {entry["id"]: entry for entry in node.get("/v1/models")["data"]}


def _wait_for_model(node: LiveNode, model: str, timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entry = _models(node).get(model)
        if entry is not None:
            return entry
        time.sleep(1)
    pytest.fail(f"{model} never appeared in {node.data_dir.name}'s /v1/models: {sorted(_models(node))}")


def _chat(node: LiveNode, model: str, **extra) -> httpx2.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_tokens": 24,
        **extra,
    }
    return httpx2.post(f"{node.base}/v1/chat/completions", json=body, headers=node.headers(), timeout=120)


def _credits(node: LiveNode) -> dict:
    return node.get("/api/admin/credits")


def test_each_node_lists_the_other_nodes_model(nodes):
    small, gemma = nodes
    entry = _wait_for_model(small, GEMMA)
    assert entry["owned_by"] == "network" and entry["peers"] == 1
    assert _models(small)[SMOLLM2]["owned_by"] == "swarm"
    assert _wait_for_model(gemma, SMOLLM2)["owned_by"] == "network"
    assert small.get("/api/admin/models")["network_models"] == [
        {"id": GEMMA, "n_layers": GEMMA_LAYERS, "peers": 1}
    ]


def test_a_chat_for_a_network_model_is_its_peers_own_answer(nodes):
    small, gemma = nodes
    _wait_for_model(small, GEMMA)
    completed = gemma.get("/health/ready")["node"]["totals"]["completed"]
    earned = _credits(gemma)["earned"]
    routed = _chat(small, GEMMA)
    assert routed.status_code == 200, routed.text
    answer = routed.json()
    assert answer["model"] == GEMMA
    assert gemma.get("/health/ready")["node"]["totals"]["completed"] == completed + 1  # gemma ran it
    direct = _chat(gemma, GEMMA).json()
    assert answer["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert answer["choices"][0]["message"]["content"].strip()
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [answer["usage"][key] for key in counts] == [direct["usage"][key] for key in counts]
    # Gemma's prefix cache kept the routed prompt: asked again, it computed only the last token.
    assert direct["usage"]["prompt_tokens_details"]["cached_tokens"] == direct["usage"]["prompt_tokens"] - 1
    # Gemma is paid exactly for the positions it ran for small: prompt and all but the last token.
    usage = answer["usage"]
    ran = usage["prompt_tokens"] + usage["completion_tokens"] - 1
    deadline = time.monotonic() + 30
    while _credits(gemma)["earned"] < earned + GEMMA_LAYERS * ran and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _credits(gemma)["earned"] - earned == GEMMA_LAYERS * ran
    assert _credits(small)["spent"] >= GEMMA_LAYERS * ran


def test_streaming_counting_and_the_anthropic_dialect_reach_the_peer(nodes):
    small, gemma = nodes
    _wait_for_model(small, GEMMA)
    expected = _chat(gemma, GEMMA).json()["choices"][0]["message"]["content"]
    text = ""
    body = {
        "model": GEMMA,
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_tokens": 24,
        "stream": True,
    }
    with httpx2.stream(
        "POST", f"{small.base}/v1/chat/completions", json=body, headers=small.headers(), timeout=120
    ) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: ") :])
                assert chunk["model"] == GEMMA
                for choice in chunk["choices"]:
                    text += choice["delta"].get("content") or ""
    assert text == expected
    count = {"model": GEMMA, "messages": [{"role": "user", "content": QUESTION}]}
    counted = [
        httpx2.post(f"{node.base}/v1/messages/count_tokens", json=count, headers=node.headers(), timeout=60)
        for node in (small, gemma)
    ]
    assert [reply.status_code for reply in counted] == [200, 200]
    assert counted[0].json() == counted[1].json() and counted[0].json()["input_tokens"] > 5
    message = httpx2.post(
        f"{small.base}/v1/messages",
        json={**count, "max_tokens": 24, "temperature": 0},
        headers=small.headers(),
        timeout=120,
    )
    assert message.status_code == 200, message.text
    assert message.json()["model"] == GEMMA
    assert message.json()["content"][0]["text"] == expected


def test_a_model_nobody_serves_is_still_not_found(nodes):
    small, _ = nodes
    reply = _chat(small, "nobody-serves-this")
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert error["code"] == "model_not_found" and "nobody-serves-this" in error["message"]
