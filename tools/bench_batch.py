"""Throughput under load: one stream against N concurrent ones, through the node's scheduler
and its shared batch, and how long a long prompt holds up the others' tokens.

    .venv/bin/python tools/bench_batch.py [--model smollm2-135m] [--streams 8] [--runs 5]
        [--gen-tokens 64] [--prompt-tokens 128] [--long-prompt 1024] [--sampling default]
        [--baseline llama-cpp]

Single: one request alone (tok/s of its decode). Concurrent: N requests submitted at once,
each with its own prompt; aggregate tok/s is every generated token over the wall time
from the first token to the last (and, as all_decoding, over the span where every
stream decodes: the ramp of N prefills left out; and, as streams_summed, the sum of each
stream's own decode rate, its tokens over the span from its first token to its last, the
way per-stream rates are often added up); also each request's time to first token, and the longest wait between two tokens of a stream while the others' prompts go
in (burst_longest_gap_ms). Streams decode greedily, or with `--sampling default` through
the node's default sampling chain (whose host-side cost then counts). The
*_from_submission figures count from the submission instead, prefills included, on both
sides: every generated token over the time until the last one. Single and concurrent
runs alternate `--runs` times; medians are reported, and each concurrent run's ratio to
the single run before it (*_each_run) with their median (*_paired): on a shared machine,
whose other tenants slow compute-bound work (the batched steps) and memory-bound work (one
stream's) in spells of seconds, a ratio taken within each pair moves less than the ratio
of the two medians.

Long prompt: while N-1 requests decode, one with a long prompt arrives; the others'
longest gap between two tokens is measured with chunked prefill
(inference.prefill_chunk) and with the prompt prefilled whole. With --baseline
llama-cpp, llama.cpp's single-stream decode on the same model and prompt is measured in
the same run (a child process, before the rest) for the ratio: greedy, or with `--sampling default`
through llama.cpp's own sampler chain at the same settings. Prints JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swarm.batching import SlotBatch
from swarm.bench import bench_prompt, llama_cpp_baseline, machine
from swarm.engine import enable_compilation_cache
from swarm.errors import SwarmError
from swarm.generate import Generator, Prefilling
from swarm.loader import open_model
from swarm.node_server import Job, Scheduler
from swarm.paths import data_dir as default_data_dir
from swarm.sampling import SamplingParams

# How the benchmark's streams choose tokens: "greedy" (llama.cpp's baseline decodes
# greedily too), or "default", the node's sampling chain as an API request that sets no
# sampling fields gets it (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05).
SAMPLING = {
    "greedy": SamplingParams(temperature=0.0, ignore_eos=True),
    "default": SamplingParams(ignore_eos=True, seed=0),
}


class TimedEngine:
    """The engine, with each decode step and prompt forward's wall time kept in `calls`
    as (kind, began, ended, rows): where a concurrent run's time goes."""

    def __init__(self, engine):
        self._engine = engine
        self.calls: list[tuple[str, float, float, int]] = []

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def step(self, inputs, positions, slots, cache):
        began = time.perf_counter()
        out = self._engine.step(inputs, positions, slots, cache)
        self.calls.append(("step", began, time.perf_counter(), len(slots)))
        return out

    def forward(self, inputs, start, cache, **options):
        began = time.perf_counter()
        out = self._engine.forward(inputs, start, cache, **options)
        self.calls.append(("prompt", began, time.perf_counter(), len(inputs)))
        return out

    def forward_rows(self, pieces, starts, first, cache):
        began = time.perf_counter()
        out = self._engine.forward_rows(pieces, starts, first, cache)
        self.calls.append(("prompt", began, time.perf_counter(), sum(len(piece) for piece in pieces)))
        return out


def time_spent(calls: list[tuple[str, float, float, int]], width: int, start: float, end: float) -> dict:
    """Of one run's engine calls: the median step of `width` rows, the host's median time
    between two such steps (sampling, detokenizing, scheduling), the median prompt call
    (one prompt's chunk, or several prompts' that went in together), and how much of
    [start, end] passed before the first step of `width` rows."""
    full = [(began, ended) for kind, began, ended, rows in calls if kind == "step" and rows == width]
    prompts = [ended - began for kind, began, ended, _ in calls if kind == "prompt"]
    between = [b[0] - a[1] for a, b in itertools.pairwise(full)]
    ramp = (full[0][0] - start) if full else end - start
    return {
        "step_ms": statistics.median(e - b for b, e in full) * 1000 if full else float("nan"),
        "host_between_steps_ms": statistics.median(between) * 1000 if between else float("nan"),
        "prompt_forward_ms": statistics.median(prompts) * 1000 if prompts else float("nan"),
        "ramp_ms": ramp * 1000,
        "ramp_share": ramp / (end - start),
    }


def events(generator: Generator, prompt: list[int], params: SamplingParams, chunk: int | None):
    for event in generator.stream(prompt, params, prefill_chunk=chunk):
        if isinstance(event, Prefilling):
            yield event.as_event()
        elif isinstance(event, str):
            yield {"event": "done"}
            return
        else:
            yield {"event": "text", "token_id": event.token_id}


def job_of(generator: Generator, prompt: list[int], params: SamplingParams, chunk: int | None) -> Job:
    """A scheduler job for the prompt, its length known (as a node's are)."""
    return Job(events(generator, prompt, params, chunk), prompt_left=len(prompt))


def token_times(job: Job) -> list[float]:
    """Arrival time of each token of a job, until it is done."""
    times = []
    while True:
        event = job.output.get(timeout=600)
        if event["event"] == "text":
            times.append(time.perf_counter())
        elif event["event"] in ("done", "error"):
            if event["event"] == "error":
                raise RuntimeError(event)
            return times


def run_together(
    scheduler: Scheduler,
    generator: Generator,
    prompts: list[list[int]],
    params: SamplingParams,
    chunk: int | None,
) -> tuple[float, list[list[float]]]:
    """Submits every prompt at once; the submit time and each job's token arrival times."""
    jobs = [job_of(generator, prompt, params, chunk) for prompt in prompts]
    times: dict[int, list[float]] = {}
    readers = [
        threading.Thread(target=lambda i=i, job=job: times.__setitem__(i, token_times(job)))
        for i, job in enumerate(jobs)
    ]
    for reader in readers:
        reader.start()  # each job's tokens are timed as they come, not after the others'
    began = time.perf_counter()
    for job in jobs:
        scheduler.submit(job)
    for reader in readers:
        reader.join()
    return began, [times[i] for i in range(len(jobs))]


def longest_gap_during_long_prompt(
    scheduler: Scheduler,
    generator: Generator,
    short: list[list[int]],
    long_prompt: list[int],
    params: SamplingParams,
    chunk: int | None,
) -> dict[str, float]:
    """Others decode; a long prompt arrives; their longest gap between tokens meanwhile."""
    jobs = [job_of(generator, prompt, params, chunk) for prompt in short]
    for job in jobs:
        scheduler.submit(job)
    results: dict[int, list[float]] = {}
    readers = [
        threading.Thread(target=lambda i=i, job=job: results.__setitem__(i, token_times(job)))
        for i, job in enumerate(jobs)
    ]
    for reader in readers:
        reader.start()
    time.sleep(1.0)  # the others are decoding
    arrived = time.perf_counter()
    long_job = job_of(generator, long_prompt, dataclasses.replace(params, max_tokens=4), chunk)
    scheduler.submit(long_job)
    long_times = token_times(long_job)
    for reader in readers:
        reader.join()
    gaps = []
    for times in results.values():
        for before, after in itertools.pairwise(times):
            if arrived <= after <= long_times[0] + 0.5:
                gaps.append(after - before)
    return {
        "long_prompt_first_token_ms": (long_times[0] - arrived) * 1000,
        "others_longest_gap_ms": max(gaps, default=0.0) * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument(
        "--long-prompt", type=int, default=1024, help="its length in tokens; 0 leaves that part out"
    )
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5, help="alternated single and concurrent runs")
    parser.add_argument("--sampling", choices=sorted(SAMPLING), default="greedy")
    parser.add_argument("--baseline", choices=["llama-cpp"])
    args = parser.parse_args()
    for name in ("streams", "prompt_tokens", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.gen_tokens < 2:
        parser.error("--gen-tokens must be at least 2 (a decode rate spans two tokens or more)")
    if args.long_prompt < 0 or args.chunk < 1:
        parser.error("--long-prompt must be 0 or more and --chunk at least 1")
    sampling = SAMPLING[args.sampling]

    def params(tokens: int) -> SamplingParams:
        return dataclasses.replace(sampling, max_tokens=tokens)

    data_dir = default_data_dir(os.environ)
    enable_compilation_cache(data_dir / "cache" / "xla")  # as a node keeps its programs
    model = open_model(args.model, data_dir)
    engine = TimedEngine(model.engine())
    vocab = model.config.vocab_size
    base = bench_prompt(model.tokenizer, args.prompt_tokens)

    def prompt(index: int, length: int = args.prompt_tokens) -> list[int]:
        text = bench_prompt(model.tokenizer, length)
        return [(text[0] + 1 + index) % vocab, *text[1:]]

    baseline = None
    if args.baseline == "llama-cpp":  # first: a baseline that cannot run fails before the long part
        try:
            baseline = llama_cpp_baseline(
                str(model.path), base, args.gen_tokens, 3, sampled=args.sampling == "default"
            )
        except SwarmError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    batch = SlotBatch(engine, args.streams, 4096)
    # As a node warms up: every chunk size a prompt is cut to, and the calls that run
    # several arriving prompts together.
    batch.warm_up_chunked(args.chunk)
    generator = Generator(engine, model.tokenizer, batch=batch)
    scheduler = Scheduler(max_active=args.streams, max_waiting=64, prompt_budget=args.chunk)
    report: dict = {
        "model": args.model,
        "streams": args.streams,
        "gen_tokens": args.gen_tokens,
        "sampling": args.sampling,
        "machine": machine(),
    }
    try:
        # Compile every shape the timed runs reach (each row count and attention bound).
        run_together(
            scheduler,
            generator,
            [prompt(i) for i in range(args.streams)],
            params(args.gen_tokens),
            args.chunk,
        )
        run_together(scheduler, generator, [prompt(args.streams)], params(args.gen_tokens), args.chunk)
        batch.settle()  # what the warm-up runs asked for compiled: none while timing
        batch.stop_preparing()
        singles, aggregates, steadies, first_tokens, burst_gaps = [], [], [], [], []
        singles_whole, aggregates_whole, summed = [], [], []
        spent_single, spent_together = [], []
        for run in range(args.runs):  # alternated, so a noisy spell of the machine hits both alike
            engine.calls.clear()
            began, (times,) = run_together(
                scheduler, generator, [prompt(100 + run)], params(args.gen_tokens), args.chunk
            )
            singles.append((len(times) - 1) / (times[-1] - times[0]))
            singles_whole.append(len(times) / (times[-1] - began))
            spent_single.append(time_spent(engine.calls, 1, times[0], times[-1]))
            engine.calls.clear()
            prompts = [prompt(200 + run * args.streams + i) for i in range(args.streams)]
            began, times = run_together(scheduler, generator, prompts, params(args.gen_tokens), args.chunk)
            start = min(t[0] for t in times)
            end = max(t[-1] for t in times)
            spent_together.append(time_spent(engine.calls, args.streams, start, end))
            aggregates.append(sum(len(t) - 1 for t in times) / (end - start))
            aggregates_whole.append(sum(len(t) for t in times) / (end - began))
            summed.append(sum((len(t) - 1) / (t[-1] - t[0]) for t in times))
            # While every stream decodes: from the last first token to the first last token.
            low, high = max(t[0] for t in times), min(t[-1] for t in times)
            inside = sum(sum(1 for x in t if low < x <= high) for t in times)
            steadies.append(inside / (high - low) if high > low else float("nan"))
            first_tokens.append([(t[0] - began) * 1000 for t in times])
            burst_gaps.append(max(b - a for t in times for a, b in itertools.pairwise(t)) * 1000)
        report["single_tok_s"] = statistics.median(singles)
        report["aggregate_tok_s"] = statistics.median(aggregates)
        report["aggregate_over_single"] = report["aggregate_tok_s"] / report["single_tok_s"]
        # Each concurrent run over the single run just before it: a noisy spell of the
        # machine then moves both sides of a ratio.
        report["aggregate_over_single_each_run"] = [
            round(a / s, 3) for a, s in zip(aggregates, singles, strict=True)
        ]
        report["aggregate_over_single_paired"] = statistics.median(report["aggregate_over_single_each_run"])
        report["single_from_submission_tok_s"] = statistics.median(singles_whole)
        report["aggregate_from_submission_tok_s"] = statistics.median(aggregates_whole)
        report["aggregate_over_single_from_submission"] = (
            report["aggregate_from_submission_tok_s"] / report["single_from_submission_tok_s"]
        )
        report["from_submission_each_run"] = [
            round(a / s, 3) for a, s in zip(aggregates_whole, singles_whole, strict=True)
        ]
        report["from_submission_paired"] = statistics.median(report["from_submission_each_run"])
        report["streams_summed_tok_s"] = statistics.median(summed)
        report["streams_summed_over_single"] = report["streams_summed_tok_s"] / report["single_tok_s"]
        report["all_decoding_tok_s"] = statistics.median(steadies)
        report["all_decoding_over_single"] = report["all_decoding_tok_s"] / report["single_tok_s"]
        middle = first_tokens[len(first_tokens) // 2]
        report["first_token_ms"] = {
            "min": min(middle),
            "median": statistics.median(middle),
            "max": max(middle),
        }
        report["burst_longest_gap_ms"] = statistics.median(burst_gaps)
        # Where the time goes (medians over the runs): the concurrent run's first-to-last
        # window is its ramp (the other prompts' forwards, one per round) plus its steps
        # of every stream and the host's work between them.
        report["time_spent"] = {
            "single": {
                key: statistics.median(s[key] for s in spent_single)
                for key in ("step_ms", "host_between_steps_ms")
            },
            "concurrent": {
                key: statistics.median(s[key] for s in spent_together) for key in spent_together[0]
            },
        }
        report["batch"] = batch.stats.as_dict()
        tokens = args.gen_tokens * 2
        for label, chunk in (("long_prompt_chunked", args.chunk), ("long_prompt_whole", None)):
            if not args.long_prompt:
                break
            for run in range(2):  # the first compiles the long prompt's shapes
                others = [prompt(300 + 10 * run + i) for i in range(args.streams - 1)]
                long_prompt = prompt(900 + run + (chunk is None) * 50, args.long_prompt)
                report[label] = longest_gap_during_long_prompt(
                    scheduler, generator, others, long_prompt, params(tokens), chunk
                )
                batch.stop_preparing()
    finally:
        scheduler.stop()
    if baseline is not None:
        report["llama_cpp_single_tok_s"] = baseline["decode_tok_s"]
        report["single_over_llama_cpp"] = report["single_tok_s"] / report["llama_cpp_single_tok_s"]
        report["aggregate_over_llama_cpp"] = report["aggregate_tok_s"] / report["llama_cpp_single_tok_s"]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
