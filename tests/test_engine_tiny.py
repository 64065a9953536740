"""The engine on tiny random models of every architecture, against llama.cpp.

Each tiny model was run through llama.cpp by tools/make_fixtures.py, which stored its
logits at every prompt position and at every step of a greedy continuation. These tests
rebuild the same GGUF, run our engine on the same token ids, and compare.
"""

from __future__ import annotations

import hashlib
import itertools
import threading

import jax
import numpy as np
import pytest

from kernels import cpu
from kernels.qtensor import PANELS, QuantTensor
from swarm.batching import SlotBatch
from swarm.engine import PREFILL_BUCKETS, Engine, EngineSettings, chunk_plan
from swarm.errors import InvalidRequestError
from swarm.gguf_file import GGUFFile
from swarm.model_config import ModelConfig
from swarm.sampling import ScoredRows
from tests.conftest import load_fixture
from tests.tiny_models import TINY_SPECS

SPECS = sorted(TINY_SPECS)


def _open(path):
    gguf = GGUFFile.open(path)
    return gguf, ModelConfig.from_metadata(gguf.metadata, tensor_names=frozenset(gguf.tensors))


def _teacher_forced_logits(engine: Engine, prompt: list[int], continuation: list[int]):
    cache = engine.new_cache(engine.cache_capacity(len(prompt) + len(continuation)))
    prompt_logits, cache = engine.forward(np.asarray(prompt, np.int32), 0, cache, all_logits=True)
    decode_logits = []
    for step, token in enumerate(continuation):
        logits, cache = engine.forward(np.asarray([token], np.int32), len(prompt) + step, cache)
        decode_logits.append(logits)
    return prompt_logits, np.stack(decode_logits)


def _assert_close_to_llama_cpp(ours: np.ndarray, theirs: np.ndarray, label: str) -> None:
    # llama.cpp rounds activations to 8 bits inside quantized dot products, so its
    # logits carry that noise: up to 7 % of the logit spread at single positions of
    # these random 4-bit models, 1-2 % typically. The exact comparison is on F32
    # copies (test_f32_copies_match_llama_cpp_exactly).
    spread = float(theirs.max() - theirs.min())
    error = np.abs(ours - theirs).max(axis=-1)
    assert error.max() <= 0.1 * spread, f"{label}: max |diff| {error.max():.4f} vs spread {spread:.3f}"
    assert np.median(error) <= 0.03 * spread, f"{label}: median |diff| {np.median(error):.4f}"


@pytest.mark.parametrize("spec_name", SPECS)
def test_tiny_model_matches_llama_cpp(tiny_model, spec_name):
    fixture = load_fixture(f"tiny-{spec_name}")
    path = tiny_model(spec_name)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == fixture["model_file_sha256"]
    gguf, config = _open(path)
    engine = Engine.load(gguf, config)
    prompt = fixture["prompt_token_ids"]
    continuation = fixture["token_ids"]
    prompt_logits, decode_logits = _teacher_forced_logits(engine, prompt, continuation)
    _assert_close_to_llama_cpp(prompt_logits, np.asarray(fixture["prompt_logits"]), "prompt")
    _assert_close_to_llama_cpp(decode_logits, np.asarray(fixture["decode_logits"]), "decode")
    # Greedy choices agree wherever llama.cpp's choice is clear of its rounding noise.
    theirs = np.concatenate([np.asarray(fixture["prompt_logits"]), np.asarray(fixture["decode_logits"])])
    ours = np.concatenate([prompt_logits, decode_logits])
    top2 = np.sort(theirs, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1.0
    assert np.array_equal(ours.argmax(1)[clear], theirs.argmax(1)[clear])


@pytest.mark.parametrize("spec_name", SPECS)
def test_layer_ranges_compose(tiny_model, spec_name):
    """[0, k) then [k, L) on hidden states equals [0, L), for every split point."""
    gguf, config = _open(tiny_model(spec_name))
    prompt = np.asarray(load_fixture(f"tiny-{spec_name}")["prompt_token_ids"], np.int32)
    # An f32 cache: with f16 the comparison would see f16 rounding of last-bit noise.
    settings = EngineSettings(kv_cache="f32")
    whole = Engine.load(gguf, config, settings=settings)
    expected, _ = whole.forward(prompt, 0, whole.new_cache(256), all_logits=True)
    for split in range(1, config.n_layers):
        head = Engine.load(gguf, config, (0, split), settings)
        tail = Engine.load(gguf, config, (split, config.n_layers), settings)
        hidden, _ = head.forward(prompt, 0, head.new_cache(256))
        assert hidden.shape == (len(prompt), config.d_model)
        logits, _ = tail.forward(hidden, 0, tail.new_cache(256), all_logits=True)
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5, err_msg=f"split at {split}")


@pytest.mark.parametrize("spec_name", ["llama-tiny", "gemma3-tiny"])
def test_packed_weights_match_f32_weights(tiny_model, spec_name):
    """Quantized weights kept packed, decoded by the reference products, give the f32 path's
    logits (the CPU kernel's 8-bit activations are checked in test_kernels_cpu)."""
    gguf, config = _open(tiny_model(spec_name))
    prompt = np.asarray(load_fixture(f"tiny-{spec_name}")["prompt_token_ids"], np.int32)
    results = []
    for weights in ("f32", "packed"):
        settings = EngineSettings(weights=weights, kv_cache="f32", kernels="reference")
        engine = Engine.load(gguf, config, settings=settings)
        logits, _ = engine.forward(prompt, 0, engine.new_cache(256), all_logits=True)
        results.append(logits)
    np.testing.assert_allclose(results[1], results[0], rtol=1e-4, atol=1e-4)


def test_chunked_prefill_equals_one_pass(tiny_model):
    """A prompt longer than the largest bucket runs in chunks with the same result."""
    gguf, config = _open(tiny_model("gemma3-tiny"))
    prompt = np.asarray(load_fixture("tiny-gemma3-tiny")["prompt_token_ids"], np.int32)
    # The reference products: the CPU kernel's 8-bit activations would turn the last-bit
    # differences of another summation order into visible ones.
    whole = Engine.load(gguf, config, settings=EngineSettings(kv_cache="f32", kernels="reference"))
    expected, _ = whole.forward(prompt, 0, whole.new_cache(256), all_logits=True)
    settings = EngineSettings(prefill_buckets=(4, 8), kv_cache="f32", kernels="reference")
    chunked = Engine.load(gguf, config, settings=settings)
    logits, _ = chunked.forward(prompt, 0, chunked.new_cache(256), all_logits=True)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not cpu.fused_available(), reason="needs the AVX-512 VNNI build of kernels.cpu")
def test_logits_come_with_their_greedy_tokens_on_the_kernel_path(tiny_model):
    """A step's rows (in the order asked, not the cache's) and a prompt's last logits carry
    each row's argmax, found in the program; the reference path's logits carry none."""
    gguf, config = _open(tiny_model("llama-tiny"))
    engine = Engine.load(gguf, config)
    prompt = np.asarray(load_fixture("tiny-llama-tiny")["prompt_token_ids"], np.int32)
    cache = engine.new_cache(256, 4)
    for slot in range(4):
        last, cache = engine.forward(prompt[: 3 + slot], 0, cache, slot=slot)
        assert isinstance(last, ScoredRows) and last.best == int(np.argmax(last))
    slots = np.asarray([2, 0, 3], np.int32)
    out, _ = engine.step(np.asarray([5, 9, 11], np.int32), slots + 3, slots, cache)
    assert isinstance(out, ScoredRows)
    np.testing.assert_array_equal(out.best, np.argmax(out, axis=-1))
    reference = Engine.load(gguf, config, settings=EngineSettings(kernels="reference"))
    plain, _ = reference.forward(prompt, 0, reference.new_cache(256))
    assert type(plain) is np.ndarray


def test_cached_rows_loaded_in_pieces_equal_them_loaded_whole(tiny_model):
    """A prefix hit's blocks go into the cache as they are (the engine joins them as it
    pads them): the cache then holds what one joined array leaves, bit for bit, and the
    next token's logits are the same; no rows at all is refused."""
    gguf, config = _open(tiny_model("llama-tiny"))
    engine = Engine.load(gguf, config)
    prompt = np.asarray(load_fixture("tiny-llama-tiny")["prompt_token_ids"], np.int32)
    _, source = engine.forward(prompt, 0, engine.new_cache(256, 2), slot=1)
    keys, values = engine.cache_rows(source, 0, len(prompt), slot=1)
    cut = [0, 3, 4, len(prompt)]  # uneven pieces, as a prompt's blocks and tail are
    pieces = [(keys[:, a:b], values[:, a:b]) for a, b in itertools.pairwise(cut)]
    whole = engine.with_rows(engine.new_cache(256, 2), keys, values, slot=1)
    joined = engine.with_rows(
        engine.new_cache(256, 2), [k for k, _ in pieces], [v for _, v in pieces], slot=1
    )
    np.testing.assert_array_equal(np.asarray(joined.keys), np.asarray(whole.keys))
    np.testing.assert_array_equal(np.asarray(joined.values), np.asarray(whole.values))
    token, position = np.asarray([5], np.int32), np.asarray([len(prompt)], np.int32)
    expected, _ = engine.step(token, position, np.asarray([1], np.int32), whole)
    got, _ = engine.step(token, position, np.asarray([1], np.int32), joined)
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(InvalidRequestError, match="no cache rows"):
        engine.with_rows(engine.new_cache(256, 2), [], [], slot=1)


def _plan_rows(plan: list[tuple[int, int]], call_rows: int) -> int:
    return sum(bucket + call_rows for _, bucket in plan)


def test_a_prompt_just_past_a_bucket_is_not_padded_to_the_next():
    """On CPU a 129-token prompt ran as one call padded to 256 rows: twice the compute."""
    assert chunk_plan(129, PREFILL_BUCKETS, 16) == [(128, 128), (1, 1)]
    assert chunk_plan(300, PREFILL_BUCKETS, 16) == [(256, 256), (44, 64)]
    assert chunk_plan(128, PREFILL_BUCKETS, 16) == [(128, 128)]
    assert chunk_plan(100, PREFILL_BUCKETS, 16) == [(100, 128)]  # a little padding beats a call
    # Where calls cost far more than rows (a GPU), each chunk stays one padded call.
    assert chunk_plan(129, PREFILL_BUCKETS, 1 << 30) == [(129, 256)]
    assert chunk_plan(1100, PREFILL_BUCKETS, 1 << 30) == [(512, 512), (512, 512), (76, 128)]


def test_a_call_costs_more_rows_on_more_cores(monkeypatch):
    """A row's compute spreads over the cores, a call's weight streaming does not: on two
    cores a 200-token prompt runs as 128 + 64 + 16, on sixteen as one call of 256."""
    settings = EngineSettings()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(2)))
    assert settings.call_rows() == 16
    assert chunk_plan(200, PREFILL_BUCKETS, settings.call_rows()) == [(128, 128), (64, 64), (8, 16)]
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert chunk_plan(200, PREFILL_BUCKETS, settings.call_rows()) == [(200, 256)]
    assert EngineSettings(prefill_call_rows=0).call_rows() == 0
    # Where the OS has no affinity mask (macOS), every CPU counts.
    monkeypatch.delattr("os.sched_getaffinity")
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert settings.call_rows() == 32


@pytest.mark.parametrize("call_rows", [0, 3, 16, 1 << 30])
def test_a_chunk_plan_covers_the_prompt_in_order_at_the_least_cost(call_rows):
    buckets = (4, 8, 16)
    for total in range(1, 60):
        plan = chunk_plan(total, buckets, call_rows)
        assert sum(take for take, _ in plan) == total
        assert all(0 < take <= bucket and bucket in (1, *buckets) for take, bucket in plan)
        assert all(take == bucket for take, bucket in plan if bucket == 1)
        # Never dearer than padding each largest-bucket piece to its bucket, as before.
        pieces = [min(16, total - start) for start in range(0, total, 16)]
        padded = [(piece, 1 if piece == 1 else min(b for b in buckets if b >= piece)) for piece in pieces]
        assert _plan_rows(plan, call_rows) <= _plan_rows(padded, call_rows)


@pytest.mark.skipif(not cpu.available(), reason=f"{cpu.unavailable_reason()}")
@pytest.mark.parametrize("spec_name", ["llama-tiny", "gemma3-tiny"])
def test_kernel_engine_gives_a_position_the_same_logits_in_any_chunk(tiny_model, spec_name):
    """On the CPU kernels every position's logits are the same bits whether its prompt
    ran whole or in chunks: a prefix-cache hit then continues exactly as a cold run."""
    gguf, config = _open(tiny_model(spec_name))
    prompt = np.asarray(load_fixture(f"tiny-{spec_name}")["prompt_token_ids"], np.int32)
    whole = Engine.load(gguf, config)
    expected, _ = whole.forward(prompt, 0, whole.new_cache(256), all_logits=True)
    chunked = Engine.load(gguf, config, settings=EngineSettings(prefill_buckets=(4, 8)))
    logits, _ = chunked.forward(prompt, 0, chunked.new_cache(256), all_logits=True)
    np.testing.assert_array_equal(logits, expected)


@pytest.mark.skipif(not cpu.available(), reason=f"{cpu.unavailable_reason()}")
def test_a_prompt_cut_to_its_buckets_gives_the_logits_of_one_padded_call(tiny_model):
    """Rows of whole buckets are the same bits; a one-row call (the decode step's
    program) may round its last bits otherwise, as a one-token prefix-cache suffix did."""
    gguf, config = _open(tiny_model("llama-tiny"))
    prompt = np.asarray(load_fixture("tiny-llama-tiny")["prompt_token_ids"], np.int32)[:9]
    results = []
    for call_rows in (1 << 30, 0):  # [(9, 16)], then [(8, 8), (1, 1)]
        settings = EngineSettings(prefill_buckets=(4, 8, 16), prefill_call_rows=call_rows)
        engine = Engine.load(gguf, config, settings=settings)
        logits, cache = engine.forward(prompt, 0, engine.new_cache(256), all_logits=True)
        results.append((logits, np.asarray(cache.keys[:, 0, :9], np.float32)))
    assert chunk_plan(9, (4, 8, 16), 0) == [(8, 8), (1, 1)]
    np.testing.assert_array_equal(results[1][0][:8], results[0][0][:8])
    np.testing.assert_array_equal(results[1][1][:, :8], results[0][1][:, :8])
    np.testing.assert_allclose(results[1][0][8], results[0][0][8], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-3, atol=1e-3)
    assert np.argmax(results[1][0][8]) == np.argmax(results[0][0][8])


@pytest.mark.parametrize("spec_name", ["llama-tiny", "gemma3-tiny"])
def test_a_prepared_step_runs_without_compiling(tiny_model, spec_name):
    """What a batch compiles ahead (prepare_step) is all its step needs, the token
    embedding and rotary tables included, in a first range and a later one alike."""
    gguf, config = _open(tiny_model(spec_name))
    split = config.n_layers // 2
    for layers in ((0, config.n_layers), (split, config.n_layers)):
        engine = Engine.load(gguf, config, layers)
        cache = engine.new_cache(256, 4)
        assert engine.prepare_step(3, 10, cache)
        assert not engine.prepare_step(3, 10, cache)  # once
        compiled = engine.compile_seconds
        inputs = (
            np.asarray([5, 6, 7], np.int32) if engine.is_first else np.ones((3, config.d_model), np.float32)
        )
        out, cache = engine.step(inputs, np.asarray([10, 4, 9], np.int32), np.asarray([0, 1, 2]), cache)
        assert out.shape[0] == 3 and np.isfinite(out).all()
        assert engine.compile_seconds == compiled, layers


def test_a_prepared_prompt_chunk_runs_without_compiling(tiny_model):
    """What a batch compiles ahead for prompts (prepare_prefill) is what a chunk of that
    size needs in any row and from any position, prologue included."""
    gguf, config = _open(tiny_model("llama-tiny"))
    engine = Engine.load(gguf, config, settings=EngineSettings(prefill_buckets=(4, 8)))
    cache = engine.new_cache(256, 4)
    assert engine.prepare_prefill(8, cache) and engine.prepare_prefill(4, cache)
    assert not engine.prepare_prefill(8, cache)  # once
    compiled = engine.compile_seconds
    if engine._whole_bound:
        out, cache = engine.forward(np.arange(1, 13, dtype=np.int32), 0, cache, slot=2)  # 8 + 4
        assert np.isfinite(out).all()
        out, cache = engine.forward(np.arange(1, 9, dtype=np.int32), 40, cache, slot=1)
    else:  # elsewhere a chunk further on reads a wider bound: the prepared chunks start prompts
        out, cache = engine.forward(np.arange(1, 9, dtype=np.int32), 0, cache, slot=2)
        out, cache = engine.forward(np.arange(1, 5, dtype=np.int32), 0, cache, slot=3)
    assert np.isfinite(out).all()
    assert engine.compile_seconds == compiled
    split = Engine.load(gguf, config, (1, config.n_layers))
    assert not split.prepare_prefill(8, split.new_cache(256, 4))  # hidden states come from peers


def test_a_program_two_threads_want_at_once_compiles_once(tiny_model):
    """A request needing the chunk a batch is compiling in the background waits for
    that compile instead of running a second one beside it."""
    gguf, config = _open(tiny_model("llama-tiny"))
    engine = Engine.load(gguf, config, settings=EngineSettings(prefill_buckets=(4, 8)))
    cache = engine.new_cache(256, 4)
    engine.prepare_prefill(4, cache)  # the prologues, so that both threads race for the layers only
    start = threading.Barrier(3)
    results = []

    def want() -> None:
        start.wait()
        results.append(engine.prepare_prefill(8, cache))

    threads = [threading.Thread(target=want) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert engine.compiles == 2  # the 4-row chunk, then the 8-row one once
    out, cache = engine.forward(np.arange(1, 9, dtype=np.int32), 0, cache, slot=0)
    assert engine.compiles == 2 and np.isfinite(out).all()


@pytest.mark.parametrize("spec_name", SPECS)
def test_scanned_and_unrolled_layers_agree(tiny_model, spec_name):
    """The scan (GPU default) and the unrolled loop (CPU default) compute the same model.

    With packed weights the layers group by quant type (gemma3-tiny mixes K-quants
    across layers), so this also covers several scans in one range.
    """
    gguf, config = _open(tiny_model(spec_name))
    prompt = np.asarray(load_fixture(f"tiny-{spec_name}")["prompt_token_ids"], np.int32)
    results = []
    for layers, weights in (("unroll", "f32"), ("scan", "f32"), ("scan", "packed")):
        settings = EngineSettings(layers=layers, weights=weights, kv_cache="f32", kernels="reference")
        engine = Engine.load(gguf, config, settings=settings)
        logits, _ = engine.forward(prompt, 0, engine.new_cache(256), all_logits=True)
        results.append(logits)
    np.testing.assert_allclose(results[1], results[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(results[2], results[0], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(
    not cpu.panels_available() or jax.default_backend() != "cpu", reason="the CPU kernel's layout"
)
@pytest.mark.parametrize("spec_name", ["llama-tiny", "gemma3-tiny"])
def test_kernel_engine_holds_panels_with_the_rows_results(tiny_model, spec_name):
    """On the CPU kernel the engine holds whole-panel matrices in the PANELS layout, and
    its logits are bit for bit those of the same engine holding the GGUF's rows."""
    gguf, config = _open(tiny_model(spec_name))
    prompt = np.asarray(load_fixture(f"tiny-{spec_name}")["prompt_token_ids"], np.int32)
    engine = Engine.load(gguf, config, settings=EngineSettings(weights="packed"))
    packed = [
        leaf
        for leaf in jax.tree_util.tree_leaves(engine.weights, is_leaf=lambda x: isinstance(x, QuantTensor))
        if isinstance(leaf, QuantTensor)
    ]
    assert packed and all(w.layout == PANELS for w in packed if w.can_use_panels())
    assert any(w.layout == PANELS for w in packed)
    as_rows = jax.tree_util.tree_map(
        lambda leaf: leaf.to_rows() if isinstance(leaf, QuantTensor) else leaf,
        engine.weights,
        is_leaf=lambda x: isinstance(x, QuantTensor),
    )
    rows_engine = Engine(config, as_rows, engine.first, engine.last, engine.settings)
    results = []
    for each in (engine, rows_engine):
        logits, _ = each.forward(prompt, 0, each.new_cache(256), all_logits=True)
        results.append(np.asarray(logits))
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("spec_name", ["llama-tiny", "gemma3-tiny"])
def test_a_first_range_gives_hidden_state_inputs_the_logits_of_their_token_ids(tiny_model, spec_name):
    """A whole-model engine takes a peer's embedded rows (`embed_tokens`, the rows a
    pipeline's requester sends) as it takes token ids: the same logits, bit for bit, in a
    prompt and in a decode step, so both kinds of session can share one batch."""
    gguf, config = _open(tiny_model(spec_name))
    engine = Engine.load(gguf, config)
    prompt = np.asarray(load_fixture(f"tiny-{spec_name}")["prompt_token_ids"], np.int32)
    by_ids, ids_cache = engine.forward(prompt, 0, engine.new_cache(256, 2), slot=0)
    by_rows, rows_cache = engine.forward(engine.embed_tokens(prompt), 0, engine.new_cache(256, 2), slot=0)
    np.testing.assert_array_equal(by_rows, by_ids)
    _, ids_cache = engine.forward(prompt, 0, ids_cache, slot=1)
    _, rows_cache = engine.forward(prompt, 0, rows_cache, slot=1)
    tokens = np.asarray([5, 9], np.int32)
    positions = np.full(2, len(prompt), np.int32)
    slots = np.arange(2, dtype=np.int32)
    expected, _ = engine.step(tokens, positions, slots, ids_cache)
    stepped, _ = engine.step(engine.embed_tokens(tokens), positions, slots, rows_cache)
    np.testing.assert_array_equal(stepped, expected)
    # In a shared batch, a token id and a peer's embedded row step together, as two ids would.
    batch = SlotBatch(engine, 2, 256)
    same = engine.new_cache(256, 2)
    for slot in (batch.acquire(64), batch.acquire(64)):
        batch.prefill(slot, prompt, 0)
        same = engine.with_rows(same, *batch.rows(slot, 0, len(prompt)), slot)
    token_ticket = batch.submit(0, np.int32(7), len(prompt))
    row_ticket = batch.submit(1, engine.embed_tokens(np.asarray([8], np.int32))[0], len(prompt))
    batch.flush()
    assert batch.stats.widest == 2
    together = np.stack([token_ticket.result(), row_ticket.result()])
    ids_only, _ = engine.step(np.asarray([7, 8], np.int32), positions, slots, same)
    np.testing.assert_array_equal(together, ids_only)
