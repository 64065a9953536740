"""Time to first token for a resubmitted prompt, with the prefix cache against a cold prefill.

    .venv/bin/python tools/bench_prefix.py [--model smollm2-135m] [--prompt-tokens 512] [--runs 5]

Cold: prompts of the same length that share no prefix (each starts with a different
token), after one run to compile. Warm: the same prompt submitted again. Reports the
medians and their ratio as JSON; both are measured in the same process and run.
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

from swarm.bench import bench_prompt
from swarm.generate import Generator
from swarm.loader import open_model
from swarm.paths import data_dir as default_data_dir
from swarm.prefix_cache import PrefixCache
from swarm.sampling import SamplingParams


def first_token_s(generator: Generator, prompt: list[int]) -> float:
    began = time.perf_counter()
    events = generator.stream(prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    next(events)
    elapsed = time.perf_counter() - began
    events.close()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    model = open_model(args.model, default_data_dir(os.environ))
    generator = Generator(model.engine(), model.tokenizer, PrefixCache(512 << 20))
    base = bench_prompt(model.tokenizer, args.prompt_tokens)

    def variant(index: int) -> list[int]:
        return [(base[0] + 1 + index) % model.config.vocab_size, *base[1:]]

    first_token_s(generator, variant(0))  # compile the shapes
    cold = [first_token_s(generator, variant(i + 1)) for i in range(args.runs)]
    warm = [first_token_s(generator, variant(1)) for _ in range(args.runs)]
    report = {
        "model": args.model,
        "prompt_tokens": len(base),
        "cold_first_token_ms": statistics.median(cold) * 1000,
        "cached_first_token_ms": statistics.median(warm) * 1000,
    }
    report["speedup"] = report["cold_first_token_ms"] / report["cached_first_token_ms"]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
