"""kernels.cpu.argmax: each row's greedy token, found in the program that made the logits,
against numpy's argmax (the host's choice before it), and what carries it to the sampler:
the engine's ScoredRows and the sampler's greedy draw."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from kernels import cpu, ops
from swarm.sampling import Sampler, SamplingParams, ScoredRows

needs_kernel = pytest.mark.skipif(
    not cpu.fused_available(), reason="needs the AVX-512 VNNI build of kernels.cpu (norms, SwiGLU, argmax)"
)


def _rows(kind: str, rows: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, width)).astype(np.float32) * 4
    if kind == "ties":  # the largest value at several places: the first wins
        for row in x:
            row[rng.choice(width, size=min(3, width), replace=False)] = row.max() + 1
    elif kind == "rounded":  # runs of equal values everywhere
        x = np.round(x)
    elif kind == "nan":  # a NaN anywhere makes it the choice, as numpy's argmax takes it
        x[rng.integers(rows), rng.integers(width)] = np.nan
        x[0, -1] = np.nan
    elif kind == "minus-inf":
        x[:] = -np.inf
    elif kind == "plus-inf":
        x[:, width // 2 :] = np.inf
    return x


@needs_kernel
@pytest.mark.parametrize("kind", ["normal", "ties", "rounded", "nan", "minus-inf", "plus-inf"])
@pytest.mark.parametrize(
    ("rows", "width"),
    [(1, 1), (1, 15), (1, 49152), (2, 40000), (3, 17), (8, 49152), (9, 4097), (1, 262144)],
)
def test_each_row_gets_numpys_argmax(kind, rows, width):
    """One row split over the threads, rows one per task, widths off the vector width."""
    x = _rows(kind, rows, width, seed=rows * 7919 + width)
    got = np.asarray(jax.jit(cpu.argmax)(x))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1).astype(np.int32))


@needs_kernel
def test_leading_dimensions_keep_their_shape():
    x = _rows("normal", 6, 300, seed=3).reshape(2, 3, 300)
    got = np.asarray(cpu.argmax(x))
    assert got.shape == (2, 3)
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))


def test_only_the_cpu_kernel_path_finds_tokens_in_the_program():
    assert ops.greedy_tokens(np.zeros((2, 5), np.float32), impl="reference") is None


def test_scored_rows_index_their_tokens_with_their_rows():
    logits = _rows("normal", 4, 10, seed=1)
    rows = ScoredRows.of(logits, np.argmax(logits, axis=-1).astype(np.int32))
    assert rows[2].best == int(np.argmax(logits[2]))
    assert list(rows[1:3].best) == list(np.argmax(logits[1:3], axis=-1))
    order = np.asarray([3, 0])
    assert list(rows[order].best) == list(np.argmax(logits[order], axis=-1))
    assert [row.best for row in rows] == list(np.argmax(logits, axis=-1))  # as a batch hands them out
    assert type(np.asarray(rows)) is np.ndarray  # downstream numpy sees a plain array
    assert rows[:, 1:].best is None  # a view of other than rows carries none


def test_a_greedy_draw_takes_the_found_token_only_where_it_is_the_answer():
    logits = np.zeros(6, np.float32)
    logits[[1, 4]] = [5.0, 4.9]
    row = ScoredRows.of(logits[None], np.asarray([1], np.int32))[0]
    assert Sampler(SamplingParams(temperature=0.0)).sample(row, [2]) == 1
    # A repetition penalty on token 1 changes the answer: the logits decide then.
    penalized = Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.5))
    assert penalized.sample(row, [1]) == 4
    # So do the tokens a constraint allows.
    assert Sampler(SamplingParams(temperature=0.0)).sample(row, [], allowed=np.asarray([3, 4])) == 4
    # A sampled draw reads the logits: the same seed draws the same token with or without it.
    sampled = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    assert Sampler(sampled).sample(row) == Sampler(sampled).sample(np.asarray(row))
