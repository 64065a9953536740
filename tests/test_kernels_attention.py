"""The jnp attention reference against a naive float64 loop and hand-checkable cases."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import attention_reference


def _naive(q, k, v, positions, lengths, scale, window, softcap):
    """Loop-per-query attention in float64, written straight from the visibility rule."""
    batch, steps, q_heads, head_dim = q.shape
    group = q_heads // k.shape[2]
    out = np.zeros((batch, steps, q_heads, head_dim))
    for b in range(batch):
        for t in range(steps):
            p = positions[b, t]
            seen = [
                j
                for j in range(k.shape[1])
                if j < lengths[b] and j <= p and (window is None or p - j < window)
            ]
            for h in range(q_heads):
                if not seen:
                    continue
                keys = k[b, seen, h // group].astype(np.float64)
                scores = scale * keys @ q[b, t, h].astype(np.float64)
                if softcap is not None:
                    scores = softcap * np.tanh(scores / softcap)
                weights = np.exp(scores - scores.max())
                out[b, t, h] = weights @ v[b, seen, h // group] / weights.sum()
    return out


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "window", "softcap"),
    [(3, 3, None, None), (6, 2, 4, None), (8, 2, None, 10.0), (4, 1, 7, 25.0)],
)
def test_reference_matches_naive_loop(q_heads, kv_heads, window, softcap) -> None:
    rng = np.random.default_rng(q_heads * 10 + kv_heads)
    q = rng.standard_normal((2, 6, q_heads, 8)).astype(np.float32)
    k = rng.standard_normal((2, 12, kv_heads, 8)).astype(np.float32)
    v = rng.standard_normal((2, 12, kv_heads, 8)).astype(np.float32)
    # Row 1 has kv_length 9 < S, a padded query at -1 and one beyond kv_length.
    positions = np.array([[0, 1, 2, 3, 4, 5], [5, 6, 7, 8, -1, 11]], np.int32)
    lengths = np.array([6, 9], np.int32)
    got = attention_reference(
        q, k, v, jnp.asarray(positions), jnp.asarray(lengths),
        scale=0.5, sliding_window=window, logit_softcap=softcap,
    )  # fmt: skip
    want = _naive(q, k, v, positions, lengths, 0.5, window, softcap)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[1, 4], 0.0)


def test_window_and_length_select_exactly_the_right_keys() -> None:
    # q = 0 makes the weights uniform over the visible keys, and v[j] = j, so each
    # output is the mean index of the keys a query sees.
    capacity = 16
    q = jnp.zeros((1, 4, 1, 1))
    v = jnp.arange(capacity, dtype=jnp.float32).reshape(1, capacity, 1, 1)
    positions = jnp.array([[0, 5, 10, 14]])
    out = attention_reference(q, v, v, positions, jnp.array([12]), scale=1.0, sliding_window=3)
    # Query 10 sees 8, 9, 10; query 14 sees 12..14 but only keys < 12 exist: none -> 0.
    np.testing.assert_allclose(np.asarray(out).ravel(), [0.0, 4.0, 9.0, 0.0])
    causal = attention_reference(q, v, v, positions, jnp.array([12]), scale=1.0)
    np.testing.assert_allclose(np.asarray(causal).ravel(), [0.0, 2.5, 5.0, 5.5])


def test_large_scores_stay_finite() -> None:
    rng = np.random.default_rng(1)
    q = 1e4 * rng.standard_normal((1, 3, 2, 4)).astype(np.float32)
    k = rng.standard_normal((1, 3, 2, 4)).astype(np.float32)
    out = attention_reference(q, k, k, jnp.array([[0, 1, 2]]), jnp.array([3]), scale=1.0)
    assert np.isfinite(np.asarray(out)).all()


def test_reference_rejects_bad_shapes() -> None:
    q = jnp.zeros((1, 2, 3, 8))
    kv = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="Hq must be a multiple of Hkv"):
        attention_reference(q, kv, kv, jnp.zeros((1, 2), jnp.int32), jnp.ones((1,), jnp.int32), scale=1.0)
    kv = jnp.zeros((1, 4, 3, 8))
    with pytest.raises(ValueError, match=r"need q_positions i32\[1, 2\]"):
        attention_reference(q, kv, kv, jnp.zeros((2,), jnp.int32), jnp.ones((1,), jnp.int32), scale=1.0)
