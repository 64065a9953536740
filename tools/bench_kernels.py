"""Packed-weight CPU matmul (kernels.cpu) against XLA on real GGUF tensors.

    .venv/bin/python tools/bench_kernels.py [--models smollm2-135m,gemma3-270m] [--rows 1,8,256]
                                            [--data-dir .test-data] [--runs 7] [--json]

For each matrix shape of the models (real tensors read with gguf-py) and each
activation row count m, times three ways of computing x f32[m, k] @ w.T:

  ours       kernels.cpu.qmatmul on the packed weights in the layout the engine
             holds them in (`kernels.ops.arrange`: the panels layout)
  rows       the same kernel on the GGUF's own row layout
  xla_f32    an XLA dot on weights dequantized to f32 beforehand (what the engine
             does on CPU today: 4x the RAM)
  reference  kernels.matmul.dequant_matmul_reference: dequantize inside the jit

Each figure is the median over --runs runs of one product, timed as a loop of
products inside one jit so that Python dispatch does not count; the loop re-reads
the same matrix, so small ones are cache-resident.  The `step` rows are every
matrix of the model once (all layers and the vocabulary head, m rows each): the
weights stream from DRAM as in a decode step, the number to hold against
llama.cpp's per-token time.  For m = 1 the table gives GB/s of packed weight bytes.

The run starts and ends by measuring the machine's peak rate of the 8-bit dot-product
instruction the kernels are built on (tools/int8_peak.cc, on as many threads as the
kernels use), and each product's multiply-adds per second are given as a share of the
first: where a product stands against the hardware.  On a shared machine the peak
itself moves (a busy sibling hyperthread halves it), hence the second measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels import cpu, ops
from kernels.cpu import build
from kernels.matmul import dequant_matmul_reference
from kernels.qtensor import QuantTensor
from kernels.quant_types import type_name
from swarm.bench import machine
from swarm.models import resolve_model

REPO_ROOT = Path(__file__).resolve().parent.parent
# The layer matrices a decode step multiplies by; one tensor of each (type, shape) is
# timed (gemma3-270m mixes Q4_K and Q6_K for ffn_down, Q5_0 and Q8_0 for attn_v).
ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# Products at these sizes take seconds on the dense paths: the head runs only up to 8 rows.
HEAD_MAX_ROWS = 8
# Inside-jit loops aim at about this long per timed call.
TARGET_CALL_S = 0.05


@dataclasses.dataclass(frozen=True)
class Row:
    model: str
    matrix: str
    qtype: str
    shape: tuple[int, int]
    rows: int
    ours_us: float
    rows_layout_us: float
    xla_f32_us: float
    reference_us: float | None
    packed_bytes: int

    @property
    def packed_gb_s(self) -> float:
        return self.packed_bytes / self.ours_us / 1e3

    @property
    def gmac_s(self) -> float | None:
        """Multiply-adds per second of ours (None for the whole-step rows)."""
        if self.matrix == "step":
            return None
        return self.rows * self.shape[0] * self.shape[1] / self.ours_us / 1e3


def build_int8_peak(directory: Path) -> Path | None:
    """tools/int8_peak.cc built into `directory` for the kernels' -march, or None where
    it cannot be built."""
    compiler = build.find_compiler()
    if compiler is None:
        return None
    program = directory / "int8_peak"
    source = REPO_ROOT / "tools" / "int8_peak.cc"
    command = [compiler, "-O2", f"-march={build.target_arch()}", "-pthread", str(source), "-o", str(program)]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=build.COMPILE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return program


def int8_peak(program: Path | None, threads: int) -> dict | None:
    """The peak `program` (build_int8_peak) measures on `threads` threads:
    {"instruction", "threads", "gmac_s"}, or None where it was not built or cannot run."""
    if program is None:
        return None
    try:
        result = subprocess.run(
            [str(program), str(threads), "0.5"], check=True, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    peak = json.loads(result.stdout)
    return peak if peak["gmac_s"] > 0 else None


def _quant_tensor(tensor) -> QuantTensor:
    """A GGUF tensor (gguf-py's ReaderTensor) as a QuantTensor: rows are output features."""
    rows, cols = int(tensor.shape[1]), int(tensor.shape[0])
    packed = np.asarray(tensor.data).reshape(rows, -1)
    return QuantTensor.from_packed(packed, int(tensor.tensor_type), (rows, cols))


def _representatives(reader: gguf.GGUFReader) -> list[tuple[str, QuantTensor]]:
    """(roles, tensor): the first layer tensor of each (type, shape), named by the roles
    that share it ("attn_q+attn_output"), then the vocabulary head."""
    roles: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    first: dict[tuple[int, tuple[int, ...]], object] = {}
    for tensor in reader.tensors:
        role = tensor.name.split(".")[-2] if tensor.name.startswith("blk.") else None
        if role in ROLES:
            key = (int(tensor.tensor_type), tuple(int(d) for d in tensor.shape))
            first.setdefault(key, tensor)
            if role not in roles.setdefault(key, []):
                roles[key].append(role)
    ordered = sorted(first, key=lambda key: min(ROLES.index(role) for role in roles[key]))
    picked = [("+".join(sorted(roles[key], key=ROLES.index)), _quant_tensor(first[key])) for key in ordered]
    head = next(t for t in reader.tensors if t.name in ("output.weight", "token_embd.weight"))
    return [*picked, ("head", _quant_tensor(head))]


def _median_s(call: Callable[[], jax.Array], runs: int) -> float:
    jax.block_until_ready(call())
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _loop(product: Callable, repeats: int) -> Callable:
    """jit of `repeats` products; each input depends on the last output (no hoisting)."""

    def run(x: jax.Array, w) -> jax.Array:
        def body(_, carry):
            return carry + product(x + carry[:, :1] * 1e-30, w)[:, :1]

        return lax.fori_loop(0, repeats, body, jnp.zeros((x.shape[0], 1), jnp.float32))

    return jax.jit(run)


def _time_product(product: Callable, x: jax.Array, w, runs: int) -> float:
    """Median seconds per product."""
    single = _loop(product, 1)
    once = _median_s(lambda: single(x, w), 3)
    repeats = int(min(200, max(1, TARGET_CALL_S / max(once, 1e-6))))
    looped = _loop(product, repeats)
    return _median_s(lambda: looped(x, w), runs) / repeats


def _dense_product(x: jax.Array, dense: jax.Array) -> jax.Array:
    """The engine's CPU path today: an XLA dot on f32 weights."""
    return ops.matmul(x, dense)


def bench_matrix(model: str, label: str, w: QuantTensor, rows: int, runs: int, reference: bool) -> Row:
    x = jnp.asarray(np.random.default_rng(0).standard_normal((rows, w.in_features)), jnp.float32)
    dense = jax.block_until_ready(w.dequantize())
    ours = _time_product(cpu.qmatmul, x, ops.arrange(w, impl="cpu"), runs)
    rows_layout = _time_product(cpu.qmatmul, x, w, runs)
    xla_f32 = _time_product(_dense_product, x, dense, runs)
    ref = _time_product(dequant_matmul_reference, x, w, runs) if reference else None
    return Row(
        model,
        label,
        type_name(w.qtype),
        w.shape,
        rows,
        ours * 1e6,
        rows_layout * 1e6,
        xla_f32 * 1e6,
        None if ref is None else ref * 1e6,
        int(w.data.size),
    )


def _step(product: Callable) -> Callable:
    def run(xs: dict[int, jax.Array], weights: list) -> jax.Array:
        total = jnp.zeros((), jnp.float32)
        for w in weights:
            total = total + product(xs[w.shape[1]], w)[0, 0]
        return total

    return jax.jit(run)


def _step_seconds(product: Callable, xs: dict[int, jax.Array], weights: list, runs: int) -> float:
    step = _step(product)
    return _median_s(lambda: step(xs, weights), runs)


def bench_step(model: str, reader: gguf.GGUFReader, rows: int, runs: int) -> Row:
    """Every quantized matrix of the model once, m = rows: a decode step's products."""
    weights = [
        _quant_tensor(t) for t in reader.tensors if len(t.shape) == 2 and cpu.supports(int(t.tensor_type))
    ]
    rng = np.random.default_rng(1)
    xs = {k: jnp.asarray(rng.standard_normal((rows, k)), jnp.float32) for k in {w.shape[1] for w in weights}}
    ours = _step_seconds(cpu.qmatmul, xs, [ops.arrange(w, impl="cpu") for w in weights], runs)
    rows_layout = _step_seconds(cpu.qmatmul, xs, weights, runs)
    dense = [jax.block_until_ready(w.dequantize()) for w in weights]
    xla_f32 = _step_seconds(_dense_product, xs, dense, runs)
    del dense
    ref = _step_seconds(dequant_matmul_reference, xs, weights, max(1, runs // 2))
    packed = sum(int(w.data.size) for w in weights)
    return Row(
        model,
        "step",
        "all",
        (len(weights), 0),
        rows,
        ours * 1e6,
        rows_layout * 1e6,
        xla_f32 * 1e6,
        ref * 1e6,
        packed,
    )


def _format(row: Row, peak: dict | None) -> str:
    shape = f"{row.shape[0]} matrices" if row.matrix == "step" else f"{row.shape[0]}x{row.shape[1]}"
    ref = "-" if row.reference_us is None else f"{row.reference_us:,.1f}"
    ref_ratio = "-" if row.reference_us is None else f"{row.reference_us / row.ours_us:.1f}x"
    gbps = f"{row.packed_gb_s:.1f}" if row.rows == 1 else "-"
    gmac = "-" if row.gmac_s is None else f"{row.gmac_s:,.1f}"
    share = "-" if row.gmac_s is None or peak is None else f"{100 * row.gmac_s / peak['gmac_s']:.0f} %"
    return (
        f"| {row.model} | {row.matrix} | {row.qtype} | {shape} | {row.rows} | {row.ours_us:,.1f} | "
        f"{row.rows_layout_us:,.1f} | "
        f"{row.xla_f32_us:,.1f} | {ref} | {row.xla_f32_us / row.ours_us:.1f}x | {ref_ratio} | {gbps} | "
        f"{gmac} | {share} |"
    )


def _print(row: Row, as_json: bool, peak: dict | None) -> None:
    if as_json:
        print(json.dumps({**dataclasses.asdict(row), "gmac_s": row.gmac_s}), flush=True)
    else:
        print(_format(row, peak), flush=True)


def _print_peak(peak: dict | None, when: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"int8_peak": peak, "when": when}), flush=True)
    elif peak is None:
        print(f"int8 peak ({when}): not measured (no C++ compiler, or no 8-bit dot product on this build)")
    else:
        print(
            f"int8 peak ({when}): {peak['gmac_s']:,.1f} GMAC/s, {peak['instruction']} on {peak['threads']} threads"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--rows", default="1,8,256", help="activation row counts m")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".test-data")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no-step", action="store_true", help="skip the whole-model rows")
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per row instead of a table, after one naming the machine",
    )
    args = parser.parse_args()
    if not cpu.available():
        print(f"error: {cpu.unavailable_reason()}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as directory:
        program = build_int8_peak(Path(directory))  # built once, run at the start and the end
        return _bench(args, program)


def _bench(args: argparse.Namespace, program: Path | None) -> int:
    row_counts = [int(r) for r in args.rows.split(",")]
    header = (
        "| model | matrix | type | n x k | m | ours us | rows us | xla_f32 us | reference us | f32/ours | ref/ours "
        "| GB/s m=1 | GMAC/s | of peak |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    peak = int8_peak(program, cpu.threads())
    if args.json:
        print(
            json.dumps({"machine": machine(), "kernels": cpu.isa(), "kernel_threads": cpu.threads()}),
            flush=True,
        )
    else:
        print(
            f"jax {jax.__version__}, {jax.default_backend()}, kernel threads: {cpu.threads()}, kernels: {cpu.isa()}, "
            f"on {machine()}"
        )
    _print_peak(peak, "start", args.json)
    if not args.json:
        print(header)
    for model in args.models.split(","):
        reader = gguf.GGUFReader(resolve_model(model, args.data_dir, install_missing=False))
        for label, w in _representatives(reader):
            for rows in row_counts:
                if label == "head" and rows > HEAD_MAX_ROWS:
                    continue
                _print(
                    bench_matrix(model, label, w, rows, args.runs, reference=label != "head"), args.json, peak
                )
        if not args.no_step:
            for rows in (r for r in row_counts if r <= HEAD_MAX_ROWS):
                _print(bench_step(model, reader, rows, max(3, args.runs // 2)), args.json, peak)
    _print_peak(int8_peak(program, cpu.threads()), "end", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
