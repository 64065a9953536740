"""Time to first token for a resubmitted prompt, with the prefix cache against a cold prefill.

    .venv/bin/python tools/bench_prefix.py [--model smollm2-135m] [--prompt-tokens 512] [--runs 5]
        [--from-peer] [--follow-up 256]

Cold: prompts of the same length that share no prefix (each starts with a different
token), after one run to compile. Warm: the same prompt submitted again. Both are timed
as a node serves requests (a row of its shared batch cache, sized by the `inference`
defaults), and again as a lone request with a cache of its own (`swarm generate`, and a
node's request too long for its batch: the own_cache_* figures). From a peer
(`--from-peer`): a second node in this process, sharing its prefix cache through its
stage on loopback, first serves each prompt; this node, holding none of it, fetches the
prefix's KV over the encrypted transport and prefills only the last token. A chat's next
turn (`--follow-up N`): a prompt, its reply of N tokens, then the prompt again with the
reply and a new question after it (16 more tokens), as a node serves it, against a cold
prefill of a turn as long; the node keeps the blocks its decode steps filled, so the turn
reuses the reply too (follow_up_cached_tokens). Reports the medians and their ratios to
the cold one as JSON; all are measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swarm.batching import SlotBatch
from swarm.bench import bench_prompt, machine
from swarm.config import InferenceConfig
from swarm.generate import Generator, PromptReuse
from swarm.identity import Identity
from swarm.loader import open_model
from swarm.paths import data_dir as default_data_dir
from swarm.prefix_cache import PrefixCache
from swarm.prefix_share import BlockLayout, PrefixFetcher
from swarm.sampling import SamplingParams
from swarm.stage import StageConfig, StageEngine, StageServer

# The new question a follow-up turn ends with, in tokens.
QUESTION_TOKENS = 16


def first_token_s(generator: Generator, prompt: list[int], reuse: PromptReuse | None = None) -> float:
    began = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    events = generator.stream(prompt, params, reuse=reuse)
    next(events)
    elapsed = time.perf_counter() - began
    events.close()
    return elapsed


def from_peer(model, engine, batch: SlotBatch, prompts: list[list[int]]) -> tuple[list[float], int]:
    """First-token times of prompts whose prefix KV is fetched from a sharing peer, into a
    row of `batch` (the node's shared cache)."""
    peer_cache = PrefixCache(1 << 30)
    peer = Generator(engine, model.tokenizer, peer_cache)
    stage_engine = StageEngine(engine.config, engine.weights, engine.first, engine.last, engine.settings)
    stage = StageServer(
        stage_engine, Identity.generate(), StageConfig(model_id=model.name), prefix_cache=peer_cache
    ).start()
    try:
        config = model.config
        layout = BlockLayout(
            config.n_layers, config.n_kv_heads, config.head_dim, config.value_dim, engine.settings.kv_cache
        )
        peers = [(stage.address, stage.identity.public_key)]
        fetcher = PrefixFetcher(Identity.generate(), "swarm-local", model.name, layout, lambda: peers)
        times = []
        for index, prompt in enumerate(prompts):
            first_token_s(peer, prompt)  # the peer computes and keeps the prefix
            node = Generator(engine, model.tokenizer, PrefixCache(512 << 20), batch)
            node.prefix_fetcher = fetcher
            elapsed = first_token_s(node, prompt)
            if index:  # the first one compiles the fetched prefix's shapes
                times.append(elapsed)
        return times, fetcher.stats.fetched_blocks
    finally:
        stage.close()


def follow_ups(
    generator: Generator, prompts: list[list[int]], reply_tokens: int, question: list[int], vocab: int
) -> dict[str, float]:
    """First-token times of each prompt's next turn (prompt, its greedy reply, `question`),
    against cold prefills of turns as long that share nothing with it."""
    warm, cold, cached = [], [], []
    reply_params = SamplingParams(temperature=0.0, max_tokens=reply_tokens, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        turn = [*prompt, *generator.generate(prompt, reply_params).token_ids, *question]
        reuse = PromptReuse()
        elapsed = first_token_s(generator, turn, reuse)
        other = first_token_s(generator, [(turn[0] + 7 + index) % vocab, *turn[1:]])
        if index:  # the first compiles the turn's shapes
            warm.append(elapsed)
            cold.append(other)
            cached.append(reuse.tokens)
    return {
        "follow_up_prompt_tokens": len(turn),
        "follow_up_cached_tokens": statistics.median(cached),
        "follow_up_cold_first_token_ms": statistics.median(cold) * 1000,
        "follow_up_first_token_ms": statistics.median(warm) * 1000,
        "follow_up_speedup": statistics.median(cold) / statistics.median(warm),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--from-peer", action="store_true", help="also time fetching the prefix from a peer")
    parser.add_argument(
        "--follow-up",
        type=int,
        default=0,
        metavar="N",
        help="also time a chat's next turn after a reply of N tokens",
    )
    args = parser.parse_args()
    inference = InferenceConfig()
    # A longer prompt would leave the batch for a cache of its own: the node's figures
    # would time the lone request's path.
    if not 1 <= args.prompt_tokens < inference.batch_context:
        parser.error(f"--prompt-tokens must be 1 to {inference.batch_context - 1}, to fit a node's batch row")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.follow_up < 0 or args.prompt_tokens + args.follow_up + QUESTION_TOKENS >= inference.batch_context:
        parser.error(
            f"--follow-up must be 0 to {inference.batch_context - args.prompt_tokens - QUESTION_TOKENS - 1}:"
            " the next turn must fit a node's batch row"
        )
    model = open_model(args.model, default_data_dir(os.environ))
    engine = model.engine()
    batch = SlotBatch(
        engine, inference.max_concurrent_requests, min(inference.batch_context, engine.max_context)
    )
    base = bench_prompt(model.tokenizer, args.prompt_tokens)

    def variant(index: int) -> list[int]:
        return [(base[0] + 1 + index) % model.config.vocab_size, *base[1:]]

    report: dict = {"model": args.model, "machine": machine(), "prompt_tokens": len(base)}
    for label, shared in (("", batch), ("own_cache_", None)):
        generator = Generator(engine, model.tokenizer, PrefixCache(512 << 20), shared)
        first_token_s(generator, variant(0))  # compile the shapes
        cold = [first_token_s(generator, variant(i + 1)) for i in range(args.runs)]
        warm = [first_token_s(generator, variant(1)) for _ in range(args.runs)]
        report[f"{label}cold_first_token_ms"] = statistics.median(cold) * 1000
        report[f"{label}cached_first_token_ms"] = statistics.median(warm) * 1000
        report[f"{label}speedup"] = (
            report[f"{label}cold_first_token_ms"] / report[f"{label}cached_first_token_ms"]
        )
    if args.from_peer:
        fetched, blocks = from_peer(model, engine, batch, [variant(100 + i) for i in range(args.runs + 1)])
        report["peer_fetch_first_token_ms"] = statistics.median(fetched) * 1000
        report["peer_fetch_speedup"] = report["cold_first_token_ms"] / report["peer_fetch_first_token_ms"]
        report["peer_fetched_blocks"] = blocks
    if args.follow_up:
        generator = Generator(engine, model.tokenizer, PrefixCache(512 << 20), batch)
        prompts = [variant(300 + i) for i in range(args.runs + 1)]
        question = bench_prompt(model.tokenizer, QUESTION_TOKENS + 1)[1:]  # no BOS mid-prompt
        report.update(follow_ups(generator, prompts, args.follow_up, question, model.config.vocab_size))
    batch.stop_preparing()  # no compile in the background while the interpreter exits
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
