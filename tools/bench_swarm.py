"""Routed decode speed and failover delay on loopback, against one node and llama.cpp in the same run.

    .venv/bin/python tools/bench_swarm.py [--model smollm2-135m] [--runs 3] [--tokens 64]

Starts one whole-model node (a network of its own) and a three-node split of the same
model (each node a third of the layers; a fourth node holding the middle third joins for
the failover runs), all full `swarm run` processes on loopback. Streams the same greedy
completion from each and reports medians: decode tokens/s (tokens after the first over
their time, measured at the HTTP client), the routed/single ratio, and, when the bench
extra is installed, llama.cpp's decode rate on the same model and prompt with the ratio
to it. Failover: the middle stage carrying the request is SIGKILLed after 8 tokens; the
delay is the longest gap between tokens minus the median gap. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

import httpx2

from swarm.bench import llama_cpp_baseline, machine
from swarm.errors import SwarmError
from swarm.local_swarm import LocalNode, LocalSwarm
from swarm.models import resolve_model
from swarm.paths import data_dir as default_data_dir

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. Once upon a time,"


def stream(node: LocalNode, model_id: str, tokens: int, on_token=None) -> list[float]:
    """Arrival times of each streamed token."""
    body = {"model": model_id, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    stamps: list[float] = []
    headers = {"Authorization": f"Bearer {node.api_key}"}
    with httpx2.stream(
        "POST", f"{node.api}/v1/completions", json=body, headers=headers, timeout=600
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
                    if on_token is not None:
                        on_token(len(stamps))
    return stamps


def decode_rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0


def measure(node: LocalNode, model_id: str, tokens: int, runs: int) -> float:
    stream(node, model_id, tokens)  # compile and warm every stage
    return statistics.median(decode_rate(stream(node, model_id, tokens)) for _ in range(runs))


def stage_sessions(node: LocalNode) -> int:
    status, body = node.get("/api/admin/peers")
    return body["node"]["stage"]["sessions"] if status == 200 else 0


def failover_delay_ms(swarm: LocalSwarm, entry: LocalNode, middles: list[LocalNode], tokens: int) -> float:
    killed: list[LocalNode] = []

    def kill(count: int) -> None:
        if count == 8 and not killed:
            victim = next(node for node in middles if stage_sessions(node) > 0)
            os.kill(victim.node_pid(), signal.SIGKILL)
            killed.append(victim)

    stamps = stream(entry, swarm.model_id, tokens, on_token=kill)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    swarm.wait_ready(killed)
    return (max(gaps) - statistics.median(gaps)) * 1000.0


def llama_cpp_rate(model_path: Path, data_dir: Path, tokens: int, runs: int) -> dict | None:
    from swarm.loader import open_model

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    tokenizer = open_model(str(model_path), data_dir).tokenizer
    prompt = tokenizer.encode(PROMPT, add_bos=None, parse_special=False)
    try:
        return llama_cpp_baseline(str(model_path), prompt, tokens, runs)
    except SwarmError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--failovers", type=int, default=2)
    args = parser.parse_args()
    data_dir = default_data_dir(os.environ)
    model_path = resolve_model(args.model, data_dir)
    report: dict = {
        "model": args.model,
        "machine": machine(),
        "prompt": PROMPT,
        "tokens": args.tokens,
        "runs": args.runs,
    }
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as root:
        with LocalSwarm(
            Path(root) / "single", model_path, model_id=args.model, network_id="bench-single"
        ) as single:
            node = single.add()
            single.wait_ready()
            report["single_decode_tok_s"] = measure(node, args.model, args.tokens, args.runs)
        with LocalSwarm(
            Path(root) / "routed", model_path, model_id=args.model, network_id="bench-routed"
        ) as routed:
            a, b, _ = (routed.add(layers) for layers in ((0, 10), (10, 20), (20, 30)))
            routed.wait_ready()
            report["routed_decode_tok_s"] = measure(a, args.model, args.tokens, args.runs)
            spare = routed.add((10, 20), name="spare", join=routed.invite(a))
            routed.wait_ready([spare])
            stream(a, args.model, args.tokens)
            report["failover_delay_ms"] = [
                round(failover_delay_ms(routed, a, [b, spare], args.tokens), 1) for _ in range(args.failovers)
            ]
    report["routed_over_single"] = report["routed_decode_tok_s"] / report["single_decode_tok_s"]
    baseline = llama_cpp_rate(model_path, data_dir, args.tokens, args.runs)
    if baseline is not None:
        report["llama_cpp_decode_tok_s"] = baseline["decode_tok_s"]
        report["single_over_llama_cpp"] = report["single_decode_tok_s"] / baseline["decode_tok_s"]
        report["routed_over_llama_cpp"] = report["routed_decode_tok_s"] / baseline["decode_tok_s"]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
