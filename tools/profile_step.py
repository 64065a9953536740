"""Where a decode step's time goes: the engine's step over N sessions, sampled by `perf`.

    .venv/bin/python tools/profile_step.py [--model smollm2-135m] [--rows 1,8]
        [--position 192] [--prompt 0] [--seconds 10] [--data-dir .test-data] [--json]

For each row count, a child process prefills that many sessions of a shared batch cache
to `--position` and then runs their decode step in a loop; `perf record` samples it for
`--seconds` and the samples are summed by part: the layer matmuls, the vocabulary head,
the activation quantizer, attention, the RMS norm and SwiGLU kernels, the kernel pool's
threads waiting (a worker for the next run while the caller works alone, and the caller
for the last tasks of a run), XLA's generated code and its
runtime, Python, the OS. Each part gets its share of the process's CPU time (every
thread) and its CPU milliseconds per step; the step's wall time beside them says how
much of it the threads overlapped. Needs Linux `perf` with permission to sample the
child (perf_event_paranoid).
Prints a table, or JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

SAMPLE_HZ = 1999
# (part, test on "dso symbol"), first match wins.
PARTS: list[tuple[str, re.Pattern]] = [
    ("vocabulary head (Q8_0 matmul)", re.compile(r"(Product|Checked)<swarm_cpu::(portable::)?Q8_0>")),
    ("activation quantizer", re.compile(r"Checked<|QuantizeRow")),
    ("layer matmuls", re.compile(r"Product<|RowPairProduct<")),
    (
        "attention",
        re.compile(
            r"PairOf|Pair<|Softmax|CacheAttention|CacheWriteAttention|Rotate|Write(All)?<|Values8|Scores8"
        ),
    ),
    ("pool: the caller waiting for a run's last tasks", re.compile(r"ThreadPool::AwaitTasks")),
    ("pool: workers waiting for a run", re.compile(r"ThreadPool")),
    ("RMS norm and SwiGLU kernels", re.compile(r"RmsNorm|SwiGlu")),
    ("XLA generated code", re.compile(r"^\[JIT\]")),
    ("OS", re.compile(r"kernel\.kallsyms|\[vdso\]")),
    ("Python", re.compile(r"libpython|python3")),
    ("XLA runtime and the rest", re.compile(r".")),
]


def part_of(dso: str, symbol: str) -> str:
    """The part (of PARTS) a sample in `symbol` of `dso` counts for."""
    return next(part for part, pattern in PARTS if pattern.search(f"{dso} {symbol}"))


def child(
    model: str, rows: int, position: int, prompt: int, seconds: float, ready: Path, data_dir: Path
) -> None:
    """Runs in the profiled process: the step loop (or, with `prompt`, the loop of a prompt
    chunk of that many tokens into session 0), announced through `ready`."""
    import numpy as np

    from swarm.engine import enable_compilation_cache
    from swarm.loader import open_model

    enable_compilation_cache(data_dir / "cache" / "xla")
    engine = open_model(model, data_dir).engine()
    # A node's shared batch cache: 4096 positions per session (inference.batch_context).
    cache = engine.new_cache(
        engine.cache_capacity(max(position + max(prompt, 64), min(4096, engine.max_context))), rows
    )
    rng = np.random.default_rng(0)
    # Every session (the prompt's one) holds `position` tokens first.
    for slot in range(rows if position else 0):
        _, cache = engine.forward(rng.integers(100, 1000, position).astype(np.int32), 0, cache, slot=slot)
    if prompt:
        chunk = rng.integers(100, 1000, prompt).astype(np.int32)

        def call(cache):
            return engine.forward(chunk, position, cache, slot=0)[1]

    else:
        tokens = rng.integers(100, 1000, rows).astype(np.int32)
        positions = np.full(rows, position, np.int32)
        slots = np.arange(rows, dtype=np.int32)

        def call(cache):
            return engine.step(tokens, positions, slots, cache)[1]

    for _ in range(5):
        cache = call(cache)
    ready.write_text("ready")
    began, steps = time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        cache = call(cache)
        steps += 1
    print(json.dumps({"step_ms": (time.perf_counter() - began) / steps * 1e3, "steps": steps}))


def _perf_report(data: Path) -> list[tuple[int, str, str]]:
    """(samples, dso, symbol) of every symbol perf saw."""
    out = subprocess.run(
        [
            "perf",
            "report",
            "-i",
            str(data),
            "-n",
            "--no-children",
            "--sort",
            "dso,sym",
            "-g",
            "none",
            "--stdio",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    samples = []
    for line in out.splitlines():
        found = re.match(r"\s+[\d.]+%\s+(\d+)\s+(\S+)\s+\[.\]\s+(.*)", line)
        if found:
            samples.append((int(found.group(1)), found.group(2), found.group(3)))
    return samples


def profile(args: argparse.Namespace, rows: int) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        ready, data = Path(directory) / "ready", Path(directory) / "perf.data"
        run_seconds = args.seconds + 4
        process = subprocess.Popen(
            [sys.executable, __file__, "--child", str(rows), str(ready), str(run_seconds), *sys.argv[1:]],
            stdout=subprocess.PIPE,
            text=True,
        )
        while not ready.exists():
            if process.poll() is not None:
                raise SystemExit(f"the step loop for {rows} rows ended before it was ready")
            time.sleep(0.2)
        time.sleep(1.0)
        subprocess.run(
            [
                "perf",
                "record",
                "-F",
                str(SAMPLE_HZ),
                "-p",
                str(process.pid),
                "-o",
                str(data),
                "--",
                "sleep",
                str(args.seconds),
            ],
            capture_output=True,
            check=True,
        )
        timing = json.loads(process.communicate(timeout=600)[0].strip().splitlines()[-1])
        parts: Counter[str] = Counter()
        for count, dso, symbol in _perf_report(data):
            parts[part_of(dso, symbol)] += count
    total = sum(parts.values())
    # CPU milliseconds per step, every thread's: the samples' CPU time over the steps run meanwhile.
    steps = args.seconds * 1000 / timing["step_ms"]
    return {
        "rows": rows,
        "step_ms": timing["step_ms"],
        "cpu_ms_per_step": total / SAMPLE_HZ * 1000 / steps,
        "parts": {
            name: {"share": count / total, "cpu_ms_per_step": count / SAMPLE_HZ * 1000 / steps}
            for name, count in parts.most_common()
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", default="1,8", help="sessions in the step, one profile each")
    parser.add_argument("--position", type=int, default=192, help="tokens each session holds")
    parser.add_argument(
        "--prompt", type=int, default=0, help="profile a prompt chunk of this many tokens instead"
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        rows, ready, seconds = int(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
        args = parser.parse_args(sys.argv[5:])
        child(args.model, rows, args.position, args.prompt, seconds, ready, _data_dir(args))
        return 0
    args = parser.parse_args()
    try:
        counts = [1] if args.prompt else [int(r) for r in args.rows.split(",")]
    except ValueError:
        parser.error("--rows takes row counts separated by commas")
    if any(r < 1 for r in counts) or args.prompt < 0 or args.seconds <= 0:
        parser.error("--rows and --seconds must be positive, --prompt not negative")
    if args.position < (0 if args.prompt else 1):
        parser.error("--position must be positive (0 or more with --prompt)")
    if shutil.which("perf") is None:
        print("error: needs Linux perf (Debian: linux-perf)", file=sys.stderr)
        return 1
    results = [profile(args, rows) for rows in counts]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    names = list(dict.fromkeys(name for result in results for name in result["parts"]))
    label = (lambda r: f"prompt of {args.prompt}") if args.prompt else (lambda r: f"{r['rows']} rows")
    print("| part | " + " | ".join(f"{label(r)}: share, CPU ms/call" for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for name in names:
        cells = []
        for result in results:
            part = result["parts"].get(name)
            cells.append(
                "-" if part is None else f"{100 * part['share']:.1f} %, {part['cpu_ms_per_step']:.2f}"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| all (CPU) | " + " | ".join(f"100 %, {r['cpu_ms_per_step']:.2f}" for r in results) + " |")
    print("| step (wall) | " + " | ".join(f"{r['step_ms']:.2f} ms" for r in results) + " |")
    return 0


def _data_dir(args: argparse.Namespace) -> Path:
    from swarm.paths import data_dir

    return args.data_dir if args.data_dir is not None else data_dir(os.environ)


if __name__ == "__main__":
    sys.exit(main())
