"""kernels.cpu.cache_attention: decode steps' and prompt chunks' attention read in place
from a whole KV cache, against the jnp reference (`ops.cache_attention` with
impl="reference").

The kernel reads only the visible keys of each (query, kv head) pair, converting
f16 as it loads, so it differs from the reference by f32 summation order only: a
tolerance of 1e-5 relative to the largest |value| (the outputs are convex mixtures of
values), which a key off by one position, a wrong head or a wrong row breaks.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import cpu, ops

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"{cpu.unavailable_reason()}")


def _case(seed, *, layers=2, rows=4, capacity=96, kv_heads=2, group=3, dim=64, batch=3, dtype=np.float16):
    rng = np.random.default_rng(seed)
    shape = (layers, rows, capacity, kv_heads, dim)
    keys = rng.standard_normal(shape).astype(dtype)
    values = rng.standard_normal(shape).astype(dtype)
    q = rng.standard_normal((batch, 1, kv_heads * group, dim)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values)


def _both(q, keys, values, layer, first_row, positions, kv_length, **options):
    args = (
        q,
        keys,
        values,
        jnp.int32(layer),
        jnp.int32(first_row),
        jnp.asarray(positions, jnp.int32)[:, None],
        jnp.asarray(kv_length, jnp.int32),
    )
    got = np.asarray(ops.cache_attention(*args, impl="cpu", **options))
    want = np.asarray(ops.cache_attention(*args, impl="reference", **options))
    return got, want


def _close(got, want, values) -> bool:
    return bool(np.max(np.abs(got - want)) <= 1e-5 * float(np.max(np.abs(values))))


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["f16", "f32"])
@pytest.mark.parametrize(
    ("dim", "group", "kv_heads"),
    [(64, 3, 3), (256, 4, 1), (20, 1, 2), (40, 5, 2), (128, 8, 1)],
    ids=["smollm2", "gemma3", "narrow-mha", "group5", "group8"],
)
def test_matches_the_reference(dtype, dim, group, kv_heads) -> None:
    q, keys, values = _case(1, kv_heads=kv_heads, group=group, dim=dim, dtype=dtype)
    positions, kv_length = [0, 37, 95], [1, 38, 90]  # the last sees fewer keys than its position
    for layer in range(2):
        for first_row in (0, 1):
            got, want = _both(
                q, keys, values, layer, first_row, positions, kv_length, kv_bound=96, scale=dim**-0.5
            )
            assert _close(got, want, values), (layer, first_row, np.max(np.abs(got - want)))


@pytest.mark.parametrize(
    ("dim", "group", "kv_heads"), [(64, 3, 3), (256, 4, 1), (128, 5, 2)], ids=["smollm2", "gemma3", "group5"]
)
@pytest.mark.parametrize("batch", [2, 8, 16])
def test_wide_batches_match_the_reference(batch, dim, group, kv_heads) -> None:
    """Decode steps wide enough that a thread takes runs of whole sequences (every kv
    head), feeding the next one's keys and values (the next layer's past the last) into
    cache as it computes: in every layer, with sequences of very different lengths."""
    q, keys, values = _case(7, layers=3, rows=batch + 1, kv_heads=kv_heads, group=group, dim=dim, batch=batch)
    rng = np.random.default_rng(batch)
    positions = rng.integers(0, 96, batch)
    positions[: batch // 2] = rng.integers(0, 4, batch // 2)  # short ones first: runs of unequal counts
    kv_length = np.minimum(positions + 1, rng.integers(1, 97, batch))
    for layer in range(3):
        for first_row in (0, 1):
            got, want = _both(
                q, keys, values, layer, first_row, positions, kv_length, kv_bound=96, scale=dim**-0.5
            )
            assert _close(got, want, values), (layer, first_row, np.max(np.abs(got - want)))
        # From row 2 the last sequence's row is past the cache (padding): zeros, the rest as before.
        past = np.asarray(
            ops.cache_attention(
                q,
                keys,
                values,
                jnp.int32(layer),
                jnp.int32(2),
                jnp.asarray(positions, jnp.int32)[:, None],
                jnp.asarray(kv_length, jnp.int32),
                kv_bound=96,
                scale=dim**-0.5,
                impl="cpu",
            )
        )
        _, want = _both(
            q[:-1], keys, values, layer, 2, positions[:-1], kv_length[:-1], kv_bound=96, scale=dim**-0.5
        )
        np.testing.assert_array_equal(past[-1], 0.0)
        assert _close(past[:-1], want, values), layer


def test_sliding_window_and_bound() -> None:
    q, keys, values = _case(2)
    positions, kv_length = [10, 60, 80], [11, 61, 81]
    for window in (1, 7, 64):
        got, want = _both(
            q, keys, values, 1, 1, positions, kv_length, kv_bound=64, scale=0.125, sliding_window=window
        )
        assert _close(got, want, values), window  # position 80 sees keys [17, 64) only
    traced = jax.jit(
        lambda w: ops.cache_attention(
            q,
            keys,
            values,
            jnp.int32(0),
            jnp.int32(0),
            jnp.asarray(positions)[:, None],
            jnp.asarray(kv_length),
            kv_bound=96,
            scale=0.125,
            sliding_window=w,
            impl="cpu",
        )
    )
    got = np.asarray(traced(jnp.int32(5)))
    _, want = _both(q, keys, values, 0, 0, positions, kv_length, kv_bound=96, scale=0.125, sliding_window=5)
    assert _close(got, want, values)


def test_soft_cap() -> None:
    q, keys, values = _case(3)
    got, want = _both(
        q, keys, values, 0, 0, [5, 50, 90], [6, 51, 91], kv_bound=96, scale=1.0, logit_softcap=2.0
    )
    assert _close(got, want, values)


def test_a_row_that_sees_nothing_gets_zeros() -> None:
    """kv_length 0 (nothing written yet) and a padding row past the cache both give zeros."""
    q, keys, values = _case(4)
    got, want = _both(q, keys, values, 0, 0, [7, 96, 3], [0, 97, 4], kv_bound=96, scale=0.125)
    assert not got[0].any() and not want[0].any()
    assert not got[1].any()  # padding: the reference's value there is unspecified
    assert _close(got[2], want[2], values)


def test_long_contexts() -> None:
    """Thousands of visible keys (the per-thread score buffer grows to fit)."""
    q, keys, values = _case(5, layers=1, rows=2, capacity=5000, batch=2, kv_heads=1, group=4, dim=64)
    got, want = _both(q, keys, values, 0, 0, [4999, 3000], [5000, 3001], kv_bound=5000, scale=0.125)
    assert _close(got, want, values)


def test_scan_over_layers_reads_each_layer() -> None:
    """As the model calls it: inside a scan, with the layer index and cache traced."""
    q, keys, values = _case(6, layers=3)
    positions, kv_length = jnp.asarray([[20], [40], [60]]), jnp.asarray([21, 41, 61])

    def run(impl):
        def body(carry, layer):
            out = ops.cache_attention(
                q,
                keys,
                values,
                layer,
                jnp.int32(1),
                positions,
                kv_length,
                kv_bound=64,
                scale=0.125,
                impl=impl,
            )
            return carry, out

        return np.asarray(jax.jit(lambda: jax.lax.scan(body, 0, jnp.arange(3))[1])())

    got, want = run("cpu"), run("reference")
    assert _close(got, want, values)
    assert not np.allclose(got[0], got[1])  # each layer's own keys


def _chunk_case(seed, steps, *, dim=64, group=3, kv_heads=3, window=None):
    """A prompt chunk of `steps` queries at positions [start, start + steps) of rows 1 and 2,
    the chunk's keys already written (as the layer does before attending)."""
    q, keys, values = _case(seed, rows=3, capacity=160, kv_heads=kv_heads, group=group, dim=dim, batch=2)
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((2, steps, kv_heads * group, dim)).astype(np.float32))
    start = np.asarray([40, 3])
    positions = start[:, None] + np.arange(steps)[None, :]
    kv_length = start + steps - np.asarray([0, 2])  # the second's last two steps are padding
    return q, keys, values, positions, kv_length


@pytest.mark.parametrize("steps", [1, 2, 16, 64])
@pytest.mark.parametrize(("dim", "group", "kv_heads"), [(64, 3, 3), (256, 4, 1), (40, 5, 2)])
def test_prompt_chunks_match_the_reference(steps, dim, group, kv_heads) -> None:
    """T queries per sequence (causal within the chunk, padding steps past kv_length)."""
    q, keys, values, positions, kv_length = _chunk_case(steps, steps, dim=dim, group=group, kv_heads=kv_heads)
    args = (
        q,
        keys,
        values,
        jnp.int32(1),
        jnp.int32(1),
        jnp.asarray(positions, jnp.int32),
        jnp.asarray(kv_length),
    )
    for window in (None, 9):
        options = dict(kv_bound=128, scale=dim**-0.5, sliding_window=window)
        got = np.asarray(ops.cache_attention(*args, impl="cpu", **options))
        want = np.asarray(ops.cache_attention(*args, impl="reference", **options))
        assert got.shape == (2, steps, kv_heads * group, dim)
        real = positions < kv_length[:, None]  # padding steps: the reference's value is unspecified
        assert _close(got[real], want[real], values), (window, np.max(np.abs(got[real] - want[real])))


def test_a_query_gives_the_same_bits_in_any_chunk() -> None:
    """A prompt attended whole, in chunks, or one step at a time gives each position the
    same output bit for bit: what a prefix-cache hit and a cold prefill rely on."""
    q, keys, values, positions, _ = _chunk_case(9, 32)
    common = dict(kv_bound=128, scale=0.125, impl="cpu")

    def run(lo, hi):
        return np.asarray(
            ops.cache_attention(
                q[:1, lo:hi],
                keys,
                values,
                jnp.int32(0),
                jnp.int32(1),
                jnp.asarray(positions[:1, lo:hi], jnp.int32),
                jnp.asarray([positions[0, hi - 1] + 1]),
                **common,
            )
        )

    whole = run(0, 32)
    np.testing.assert_array_equal(np.concatenate([run(0, 13), run(13, 32)], axis=1), whole)
    np.testing.assert_array_equal(np.concatenate([run(t, t + 1) for t in range(32)], axis=1), whole)


@pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="auto picks the CPU kernel only on the CPU backend"
)
def test_auto_uses_the_kernel_on_cpu() -> None:
    _, keys, values = _case(7)

    def lowered(steps):
        query = jnp.zeros((3, steps, 6, 64), jnp.float32)
        positions = jnp.zeros((3, steps), jnp.int32)
        call = lambda: ops.cache_attention(  # noqa: E731
            query,
            keys,
            values,
            jnp.int32(0),
            jnp.int32(0),
            positions,
            jnp.ones(3, jnp.int32),
            kv_bound=64,
            scale=0.1,
        )
        return jax.jit(call).lower().as_text()

    assert cpu.ATTENTION_TARGET in lowered(1)
    assert cpu.ATTENTION_TARGET in lowered(4)
    with ops.implementation("reference"):
        assert cpu.ATTENTION_TARGET not in lowered(1)
        assert cpu.ATTENTION_TARGET not in lowered(4)


def test_checks_its_inputs() -> None:
    q, keys, values = _case(8)
    positions, kv_length = jnp.zeros((3, 1), jnp.int32), jnp.ones(3, jnp.int32)
    common = dict(scale=0.1, logit_softcap=None, bound=64)
    zero = jnp.int32(0)
    with pytest.raises(ValueError, match="one dtype"):
        cpu.cache_attention(
            q, keys, values.astype(jnp.float32), zero, zero, zero, positions, kv_length, **common
        )
    with pytest.raises(ValueError, match="f16 or f32"):
        bf16 = keys.astype(jnp.bfloat16)
        cpu.cache_attention(q, bf16, bf16, zero, zero, zero, positions, kv_length, **common)
    with pytest.raises(ValueError, match="need q"):
        cpu.cache_attention(q[:, 0], keys, values, zero, zero, zero, positions, kv_length, **common)
    with pytest.raises(Exception, match="layer 5 is not in the cache"):
        np.asarray(
            cpu.cache_attention(q, keys, values, jnp.int32(5), zero, zero, positions, kv_length, **common)
        )


def written_by_xla(q, k, v, cos, sin, keys, values, layer, first_row, positions, *, neox):
    """What a layer runs in XLA where the kernel does not write the cache (swarm/model.py),
    compiled as the model is (XLA fuses each product into the next add): the rotated q
    and the caches. cos, sin f32[B, T, dims / 2]."""
    from swarm.model import rope

    config = SimpleNamespace(
        rope_style="neox" if neox else "norm", rope_dims=2 * cos.shape[-1], head_dim=q.shape[-1]
    )

    @jax.jit
    def run(q, k, v, keys, values):
        q, k = rope(q, cos, sin, config), rope(k, cos, sin, config)
        rows = (first_row + jnp.arange(q.shape[0], dtype=jnp.int32))[:, None]
        keys = keys.at[layer, rows, positions].set(k.astype(keys.dtype), mode="drop")
        values = values.at[layer, rows, positions].set(v.astype(values.dtype), mode="drop")
        return q, keys, values

    return run(q, k, v, keys, values)


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["f16", "f32"])
@pytest.mark.parametrize(
    ("style", "dims", "dim", "group", "kv_heads", "steps"),
    [
        ("norm", 64, 64, 3, 3, 1),  # SmolLM2's decode step
        ("neox", 256, 256, 4, 1, 1),  # Gemma 3's
        ("norm", 64, 64, 3, 3, 40),  # a prompt chunk (written on the pool)
        ("neox", 32, 64, 2, 2, 7),  # rotating part of each head
        ("norm", 16, 40, 5, 2, 33),
    ],
    ids=["smollm2-step", "gemma3-step", "smollm2-chunk", "partial-neox", "partial-norm-chunk"],
)
def test_writing_the_cache_in_the_call_equals_writing_it_in_xla(
    dtype, style, dims, dim, group, kv_heads, steps
):
    """One call rotates q and k, writes k and v into the cache and attends: the caches it
    leaves are the bits XLA's rotation, conversion and scatters leave (every slot, the
    untouched ones too), its output the attention of the XLA-rotated queries over them;
    a row past the cache and a position past it (padding) write nothing."""
    rng = np.random.default_rng(dims + steps)
    layers, rows, capacity, batch = 2, 4, 96, 3
    shape = (layers, rows, capacity, kv_heads, dim)
    keys = jnp.asarray(rng.standard_normal(shape).astype(dtype))
    values = jnp.asarray(rng.standard_normal(shape).astype(dtype))
    q = jnp.asarray(rng.standard_normal((batch, steps, kv_heads * group, dim)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((batch, steps, kv_heads, dim)).astype(np.float32) * 3)
    v = jnp.asarray(rng.standard_normal((batch, steps, kv_heads, dim)).astype(np.float32))
    angles = rng.uniform(-40, 40, (2, batch, steps, dims // 2)).astype(np.float32)
    cos, sin = jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))
    start = np.array([0, 30, capacity - steps // 2 - 1])  # the last sequence runs past the cache
    positions = jnp.asarray(start[:, None] + np.arange(steps), jnp.int32)
    kv_length = jnp.asarray(np.minimum(start + steps, capacity), jnp.int32)
    # first_row 2: the last sequence's row is past the cache (its writes are dropped).
    options = dict(kv_bound=capacity, scale=dim**-0.5)
    for layer, first_row, table in ((1, 1, 0), (0, 0, 1), (0, 2, 1)):
        rotated, want_keys, want_values = written_by_xla(
            q, k, v, cos[table], sin[table], keys, values, layer, first_row, positions, neox=style == "neox"
        )
        out, got_keys, got_values = jax.jit(
            lambda q, k, v, keys, values, layer=layer, first_row=first_row, table=table: (
                ops.cache_write_attention(
                    q,
                    k,
                    v,
                    cos,
                    sin,
                    jnp.int32(table),
                    keys,
                    values,
                    jnp.int32(layer),
                    jnp.int32(first_row),
                    positions,
                    kv_length,
                    rope_style=style,
                    impl="cpu",
                    **options,
                )
            )
        )(q, k, v, keys, values)
        np.testing.assert_array_equal(np.asarray(got_keys), np.asarray(want_keys))
        np.testing.assert_array_equal(np.asarray(got_values), np.asarray(want_values))
        if first_row + batch > rows:
            continue  # the reference reads a window of rows that fits the cache only
        want = ops.cache_attention(
            rotated,
            want_keys,
            want_values,
            jnp.int32(layer),
            jnp.int32(first_row),
            positions,
            kv_length,
            impl="reference",
            **options,
        )
        live = np.asarray(positions) < capacity  # rows past the cache get unspecified values
        assert _close(np.asarray(out)[live], np.asarray(want)[live], values), (layer, first_row)


@pytest.mark.parametrize("dim", [64, 40, 20], ids=["16s", "16s-and-8", "16-and-one-by-one"])
def test_an_f16_cache_gets_the_halves_xla_converts_to(dim):
    """Keys and values written as f16 round as XLA's convert does at the edges of the
    format too: ties to even, subnormals, the largest half, overflow to infinity, NaN
    and signed zeros, whichever stretch of a head (16, 8 or one at a time) they fall in."""
    edges = np.array(
        [
            1 + 2**-11,  # a tie: rounds down to even
            1 + 3 * 2**-11,  # a tie: rounds up to even
            2**-24,  # the smallest subnormal half
            2**-25,  # a tie with zero: rounds to zero
            3 * 2**-26,  # rounds up to the smallest subnormal
            6.1e-5,  # a subnormal near the smallest normal
            65504,  # the largest half
            65519,  # rounds down to it
            65520,  # rounds to infinity
            1e9,
            np.inf,
            -np.inf,
            np.nan,
            -0.0,
            0.0,
            -3.14159,
        ],
        np.float32,
    )
    rng = np.random.default_rng(dim)
    batch, kv_heads, group = 2, 1, 2
    v = np.resize(edges * rng.choice([-1.0, 1.0], edges.size).astype(np.float32), (batch, 1, kv_heads, dim))
    v = jnp.asarray(np.roll(v, rng.integers(dim), axis=-1))
    k = v * 0.5  # rotated by angle zero: the same edges, halved
    q = jnp.asarray(rng.standard_normal((batch, 1, kv_heads * group, dim)).astype(np.float32))
    zeros = jnp.zeros((1, batch, 1, dim // 4), jnp.float32)
    cos, sin = jnp.ones_like(zeros), zeros
    shape = (1, batch, 8, kv_heads, dim)
    keys = values = jnp.zeros(shape, jnp.float16)
    positions = jnp.asarray([[3], [5]], jnp.int32)
    kv_length = jnp.asarray([4, 6], jnp.int32)
    _, want_keys, want_values = written_by_xla(
        q, k, v, cos[0], sin[0], keys, values, 0, 0, positions, neox=False
    )
    _, got_keys, got_values = ops.cache_write_attention(
        q,
        k,
        v,
        cos,
        sin,
        jnp.int32(0),
        keys,
        values,
        jnp.int32(0),
        jnp.int32(0),
        positions,
        kv_length,
        rope_style="norm",
        impl="cpu",
        kv_bound=8,
        scale=dim**-0.5,
    )
    np.testing.assert_array_equal(np.asarray(got_keys).view(np.uint16), np.asarray(want_keys).view(np.uint16))
    np.testing.assert_array_equal(
        np.asarray(got_values).view(np.uint16), np.asarray(want_values).view(np.uint16)
    )


def test_writing_the_cache_needs_the_kernel_path_and_a_known_rope_style() -> None:
    q = jnp.zeros((1, 1, 2, 64), jnp.float32)
    kv = jnp.zeros((1, 1, 1, 64), jnp.float32)
    angles = jnp.zeros((1, 1, 1, 32), jnp.float32)
    cache = jnp.zeros((1, 1, 8, 1, 64), jnp.float16)
    args = (q, kv, kv, angles, angles, jnp.int32(0), cache, cache, jnp.int32(0), jnp.int32(0))
    rest = (jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32))
    with pytest.raises(ValueError, match="CPU kernel path only"):
        ops.cache_write_attention(*args, *rest, rope_style="norm", kv_bound=8, scale=0.125, impl="reference")
    with pytest.raises(ValueError, match="rope_style"):
        ops.cache_write_attention(*args, *rest, rope_style="yarn", kv_bound=8, scale=0.125, impl="cpu")


def test_writing_the_cache_refuses_inputs_that_do_not_fit() -> None:
    """Angles of the wrong rank, mismatched caches and a rotary table that is not there get
    a clear error, and the cache passed in is left as it was."""
    q = jnp.zeros((1, 1, 2, 64), jnp.float32)
    kv = jnp.ones((1, 1, 1, 64), jnp.float32)
    angles = jnp.zeros((1, 1, 1, 32), jnp.float32)
    cache = jnp.zeros((1, 1, 8, 1, 64), jnp.float16)
    rest = (jnp.int32(0), jnp.int32(0), jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32))
    options = dict(rope_style="norm", kv_bound=8, scale=0.125, impl="cpu")
    with pytest.raises(ValueError, match=r"cos, sin f32\[tables, B, T, dims / 2\]"):
        ops.cache_write_attention(
            q, kv, kv, angles[0], angles[0], jnp.int32(0), cache, cache, *rest, **options
        )
    with pytest.raises(ValueError, match="of one dtype"):
        ops.cache_write_attention(
            q, kv, kv, angles, angles, jnp.int32(0), cache, cache.astype(jnp.float32), *rest, **options
        )
    with pytest.raises(Exception, match="table 1 of 1"):
        jax.block_until_ready(
            ops.cache_write_attention(q, kv, kv, angles, angles, jnp.int32(1), cache, cache, *rest, **options)
        )
    assert not np.asarray(cache).any()
