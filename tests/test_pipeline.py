"""Generation through chains of stages on loopback: same tokens as one engine, privacy, failures."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from swarm import wire
from swarm.batching import SlotBatch, Ticket
from swarm.engine import EngineSettings
from swarm.generate import Generator
from swarm.identity import Identity
from swarm.loader import open_model
from swarm.pipeline import Embedder, Requester, RouteStage, StageError
from swarm.sampling import SamplingParams
from swarm.secure_channel import HandshakeError, SecureChannel
from swarm.stage import StageConfig, StageEngine, StageServer

REPO = Path(__file__).resolve().parent.parent
SETTINGS = EngineSettings(kv_cache="f32", max_context=128)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPT_TEXT = "the quick brown fox jumps over the lazy dog"


class RecordingStage(StageServer):
    """A stage that keeps every message it decodes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.received: list[wire.Message] = []
        self._record_lock = threading.Lock()

    def observe(self, message: wire.Message) -> None:
        with self._record_lock:
            self.received.append(message)


class Chain:
    """Stages for consecutive layer ranges of one model, and a requester over them."""

    def __init__(
        self,
        model,
        splits: list[tuple[int, int]],
        hop_timeout: float = 30.0,
        embed: bool = False,
        batch_rows: int = 0,
    ) -> None:
        self.model = model
        self.stages = []
        for split in splits:
            engine = StageEngine.load(model.gguf, model.config, split, SETTINGS)
            stage = RecordingStage(
                engine,
                Identity.generate(),
                StageConfig(model_id="tiny", hop_timeout=hop_timeout),
                embed=Embedder(model.gguf, model.config) if embed else None,
                batch=SlotBatch(engine, batch_rows, engine.max_context) if batch_rows else None,
            )
            self.stages.append(stage.start())
        self.requester_identity = Identity.generate()

    def route(self) -> list[RouteStage]:
        return [RouteStage(s.address, s.identity.public_key, s.layer_range) for s in self.stages]

    def requester(self, timeout: float = 30.0) -> Requester:
        return Requester(
            self.requester_identity,
            Embedder(self.model.gguf, self.model.config),
            self.model.tokenizer,
            self.route(),
            model_id="tiny",
            timeout=timeout,
        )

    def close(self) -> None:
        for stage in self.stages:
            stage.close()


@pytest.fixture(scope="module")
def llama(tiny_model, data_dir):
    return open_model(str(tiny_model("llama-tiny")), data_dir)


@pytest.fixture(scope="module")
def gemma(tiny_model, data_dir):
    return open_model(str(tiny_model("gemma3-tiny")), data_dir)


def _single(model, prompt_ids: list[int], params: SamplingParams) -> list[int]:
    return Generator(model.engine(SETTINGS), model.tokenizer).generate(prompt_ids, params).token_ids


@pytest.mark.parametrize(
    ("which", "splits"),
    [("llama", [(0, 1), (1, 3)]), ("llama", [(0, 1), (1, 2), (2, 3)]), ("gemma", [(0, 3), (3, 5), (5, 7)])],
)
def test_split_generation_matches_one_engine(request, which, splits):
    model = request.getfixturevalue(which)
    prompt_ids = model.tokenizer.encode(PROMPT_TEXT)
    chain = Chain(model, splits)
    try:
        split = chain.requester().generate(prompt_ids, GREEDY)
    finally:
        chain.close()
    assert split.token_ids == _single(model, prompt_ids, GREEDY)
    assert len(split.token_ids) == GREEDY.max_tokens


def test_concurrent_requests_share_each_stage_s_batched_steps(llama):
    prompts = [llama.tokenizer.encode(text) for text in (PROMPT_TEXT, "a b c d", "hello world again")]
    chain = Chain(llama, [(0, 1), (1, 3)], batch_rows=4)
    results: dict[int, list[int]] = {}
    try:

        def run(index: int) -> None:
            results[index] = chain.requester().generate(prompts[index], GREEDY).token_ids

        threads = [threading.Thread(target=run, args=(index,)) for index in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        deadline = time.monotonic() + 5
        while any(stage.batch.in_use() for stage in chain.stages) and time.monotonic() < deadline:
            time.sleep(0.05)  # the requesters' Close messages free the rows
        for stage in chain.stages:
            # Every decode step of every request went through the stage's batch.
            assert stage.batch.stats.rows == len(prompts) * (GREEDY.max_tokens - 1)
            assert stage.batch.in_use() == 0
    finally:
        chain.close()
    for index, prompt in enumerate(prompts):
        assert results[index] == _single(llama, prompt, GREEDY)


def test_a_whole_model_node_s_requests_and_peers_sessions_share_its_steps(llama):
    """A node holding the whole model gives its stage its own batch: a peer's pipeline
    session (its prompt as embedded rows, in chunks; then decoding at the stage) and the
    node's own request decode in the same compiled steps, each getting the tokens it gets
    alone."""
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    peer_params = SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True)
    local_prompt = llama.tokenizer.encode("hello world again")
    peer_prompt = llama.tokenizer.encode(PROMPT_TEXT)
    engine = llama.engine(SETTINGS)
    batch = SlotBatch(engine, 4, engine.max_context)
    batch.warm_up()  # compiles the steps of 1, 2 and 4 sessions
    generator = Generator(engine, llama.tokenizer, batch=batch)
    generator.generate(local_prompt, GREEDY)  # and the local prompt's shapes: no compile mid-test
    stage = StageServer(
        StageEngine(engine.config, engine.weights, engine.first, engine.last, engine.settings),
        Identity.generate(),
        StageConfig(model_id="tiny", prefill_chunk=4),
        embed=Embedder(llama.gguf, llama.config),
        batch=batch,
    ).start()
    widths: list[int] = []  # rows of each step
    step = engine.step

    def recording(inputs, positions, slots, cache):
        widths.append(len(slots))
        return step(inputs, positions, slots, cache)

    engine.step = recording
    requester = Requester(
        Identity.generate(),
        Embedder(llama.gguf, llama.config),
        llama.tokenizer,
        [RouteStage(stage.address, stage.identity.public_key, stage.layer_range)],
        model_id="tiny",
    )
    results: dict[str, list[int]] = {}
    runs = {
        "peer": lambda: requester.generate(peer_prompt, peer_params),
        "local": lambda: generator.generate(local_prompt, params),
    }
    threads = {
        name: threading.Thread(target=lambda name=name: results.__setitem__(name, runs[name]().token_ids))
        for name in runs
    }
    submit = batch.submit

    def coalescing(slot: int, inputs: np.ndarray, position: int) -> Ticket:
        # While both decode, a queued step waits (briefly) for the other's row before it
        # can run: which of two threads reaches the batch first is the machine's timing,
        # not what is tested.
        ticket = submit(slot, inputs, position)
        deadline = time.monotonic() + 0.05
        while len(batch._queued) < 2 and threads["local"].is_alive() and time.monotonic() < deadline:
            time.sleep(0.0005)
        return ticket

    try:
        threads["peer"].start()
        deadline = time.monotonic() + 30
        while len(widths) < 3 and time.monotonic() < deadline:
            time.sleep(0.001)  # the peer's session decodes in the batch
        batch.submit = coalescing
        threads["local"].start()
        for thread in threads.values():
            thread.join(60)
    finally:
        stage.close()
    assert results["local"] == _single(llama, local_prompt, params)
    assert results["peer"] == _single(llama, peer_prompt, peer_params)
    assert batch.stats.widest == 2 and widths.count(2) >= 5, widths  # steps carrying both


def test_stages_never_see_token_ids_and_cannot_open_tokens(llama):
    prompt_ids = llama.tokenizer.encode(PROMPT_TEXT)
    chain = Chain(llama, [(0, 1), (1, 2), (2, 3)])
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, top_logprobs=3)
    try:
        result = chain.requester().generate(prompt_ids, params)
    finally:
        chain.close()
    assert len(result.top_logprobs) == 4 and all(len(top) == 3 for top in result.top_logprobs)
    d_model = llama.config.d_model
    for stage in chain.stages:
        forwards = [m for m in stage.received if isinstance(m, wire.Forward)]
        assert [f.hidden_states.shape for f in forwards] == [(len(prompt_ids), d_model)] + [(1, d_model)] * 3
        for message in stage.received:
            assert isinstance(message, wire.OpenSession | wire.Forward | wire.Close)
            if isinstance(message, wire.Forward):
                assert message.hidden_states.dtype == np.float32
                # The embedded prompt is not the prompt: no row is a small integer vector.
                assert not np.array_equal(message.hidden_states[:, 0], np.asarray(prompt_ids, np.float32))
    first = chain.stages[0]
    # The sealed token relayed through the middle stages opens only with the requester's key.
    token = wire.SampledToken(result.token_ids[0])
    sealed = wire.seal_token(chain.requester_identity.public_key, "s1", 9, token)
    for stage in chain.stages:
        with pytest.raises(wire.WireError):
            wire.open_token(stage.identity, sealed)
    assert wire.open_token(chain.requester_identity, sealed) == token
    assert first.received[0].route[-1].address == chain.stages[-1].address


def test_a_killed_stage_is_named_within_the_timeout(llama):
    chain = Chain(llama, [(0, 1), (1, 2), (2, 3)], hop_timeout=5.0)
    prompt_ids = llama.tokenizer.encode(PROMPT_TEXT)
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    victim = chain.stages[2]
    began = time.monotonic()
    try:
        stream = chain.requester(timeout=10.0).stream(prompt_ids, params)
        next(stream)
        next(stream)
        victim.close()
        with pytest.raises(StageError) as failure:
            for _ in stream:
                pass
    finally:
        chain.close()
    assert victim.address in str(failure.value)
    assert "layers 2-3" in str(failure.value)
    assert time.monotonic() - began < 10.0


def test_a_stage_survives_bad_input_and_refuses_other_networks(llama):
    chain = Chain(llama, [(0, 3)])
    stage = chain.stages[0]
    try:
        with pytest.raises(HandshakeError):
            SecureChannel.connect(stage.host_port, Identity.generate(), "other-net", timeout=5.0)
        with SecureChannel.connect(
            stage.host_port, Identity.generate(), "swarm-local", timeout=5.0
        ) as channel:
            channel.send(b"garbage")
            reply = wire.decode(channel.recv())
            assert isinstance(reply, wire.Error) and stage.address in reply.message
            channel.send(
                wire.encode(wire.Forward("nope", 0, np.zeros((1, llama.config.d_model), np.float32)))
            )
            reply = wire.decode(channel.recv())
            assert reply.code == wire.UNKNOWN_SESSION and "layers 0-3" in reply.message
        prompt_ids = llama.tokenizer.encode(PROMPT_TEXT)
        assert chain.requester().generate(prompt_ids, GREEDY).token_ids == _single(llama, prompt_ids, GREEDY)
    finally:
        chain.close()


def test_a_session_is_its_connection_s_own(llama):
    """Another peer cannot step, end or fail a session it did not open, even knowing its
    id; and a session is closed only once the step under way in it is over."""
    chain = Chain(llama, [(0, 3)])
    stage = chain.stages[0]
    key = chain.requester_identity.public_key
    hidden = Embedder(llama.gguf, llama.config)(llama.tokenizer.encode(PROMPT_TEXT))
    opened = wire.OpenSession("mine", "tiny", (0, 3), GREEDY.to_dict(), key, max_context=64)
    try:
        with (
            SecureChannel.connect(
                stage.host_port, chain.requester_identity, "swarm-local", timeout=5.0
            ) as owner,
            SecureChannel.connect(stage.host_port, Identity.generate(), "swarm-local", timeout=5.0) as other,
        ):
            owner.send(wire.encode(opened))
            owner.send(wire.encode(wire.Ping(1, time.time())))
            assert isinstance(wire.decode(owner.recv()), wire.Pong)  # the session is open
            other.send(wire.encode(wire.Forward("mine", 0, hidden)))
            assert wire.decode(other.recv()).code == wire.UNKNOWN_SESSION
            other.send(wire.encode(wire.Close("mine")))  # ignored: not its session
            bad = wire.OpenSession("mine", "tiny", (0, 3), {"temperature": -1}, key, max_context=64)
            other.send(wire.encode(bad))  # fails, and must not take the owner's session down
            assert wire.decode(other.recv()).code == wire.BAD_MESSAGE
            owner.send(wire.encode(wire.Forward("mine", 0, hidden)))
            assert isinstance(wire.decode(owner.recv()), wire.TokenResult)
            session = stage._sessions["mine"]
            with session.lock:  # a step under way
                dropping = threading.Thread(target=stage._drop_session, args=(session,))
                dropping.start()
                time.sleep(0.2)
                assert not session.closed
            dropping.join(5)
            assert session.closed
    finally:
        chain.close()


def test_a_whole_model_stage_generates_alone_and_refuses_bad_generates(llama):
    chain = Chain(llama, [(0, 3)], embed=True)
    stage = chain.stages[0]
    prompt_ids = llama.tokenizer.encode(PROMPT_TEXT)
    try:
        # Handed the whole request: one Forward (the prompt), then one Generate.
        assert chain.requester().generate(prompt_ids, GREEDY).token_ids == _single(llama, prompt_ids, GREEDY)
        kinds = [type(m).__name__ for m in stage.received]
        assert kinds == ["OpenSession", "Forward", "Generate", "Close"], kinds
        with SecureChannel.connect(
            stage.host_port, Identity.generate(), "swarm-local", timeout=5.0
        ) as channel:
            channel.send(wire.encode(wire.Generate("nope", 0, 4)))
            assert wire.decode(channel.recv()).code == wire.UNKNOWN_SESSION
            opened = wire.OpenSession(
                "s1", "tiny", (0, 3), GREEDY.to_dict(), chain.requester_identity.public_key, max_context=64
            )
            channel.send(wire.encode(opened))
            channel.send(wire.encode(wire.Generate("s1", 0, 4)))  # nothing sampled yet
            reply = wire.decode(channel.recv())
            assert reply.code == wire.BAD_MESSAGE and "position" in reply.message
        assert chain.requester().generate(prompt_ids, GREEDY).token_ids == _single(llama, prompt_ids, GREEDY)
    finally:
        chain.close()


def test_a_refusal_names_the_stage_and_idle_sessions_expire(llama):
    chain = Chain(llama, [(0, 1), (1, 3)])
    prompt_ids = llama.tokenizer.encode(PROMPT_TEXT)
    first, second = chain.route()
    # The first stage serves layers 0-1; a route that asks it for 0-2 is refused by name.
    wrong = [
        RouteStage(first.address, first.public_key, (0, 2)),
        RouteStage(second.address, second.public_key, (2, 3)),
    ]
    requester = chain.requester()
    requester.route = wrong
    try:
        with pytest.raises(StageError, match=f"at {first.address} \\(layers 0-1\\): asked for layers 0-2"):
            requester.generate(prompt_ids, GREEDY)
        stage = StageServer(
            StageEngine.load(llama.gguf, llama.config, (0, 3), SETTINGS),
            Identity.generate(),
            StageConfig(model_id="tiny", session_timeout=0.2),
        ).start()
        chain.stages.append(stage)
        key = chain.requester_identity.public_key
        with SecureChannel.connect(
            stage.host_port, chain.requester_identity, "swarm-local", timeout=5.0
        ) as channel:
            channel.send(
                wire.encode(wire.OpenSession("idle", "tiny", (0, 3), GREEDY.to_dict(), key, max_context=64))
            )
            time.sleep(1.5)
            hidden = Embedder(llama.gguf, llama.config)(prompt_ids)
            channel.send(wire.encode(wire.Forward("idle", 0, hidden)))
            reply = wire.decode(channel.recv())
        assert reply.code == wire.UNKNOWN_SESSION
    finally:
        chain.close()


@pytest.mark.integration
def test_split_command_matches_one_engine(tiny_model, tmp_path):
    command = [sys.executable, "-m", "swarm", "test-split", str(tiny_model("llama-tiny"))]
    command += ["--stages", "3", "--max-tokens", "8", "--json", "--data-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["identical"] is True
    assert len(report["split"]["token_ids"]) == 8


@pytest.mark.integration
@pytest.mark.realmodel
@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "stages", "prompt"),
    # Three stages (a middle stage relays) on one model, two on the other; the tiny models
    # above split both architectures in process.
    [
        ("smollm2-135m", 3, "def fibonacci(n):"),
        ("gemma3-270m", 2, "The history of the Roman Empire"),
    ],
)
def test_split_real_models_match_one_engine(data_dir, opened_models, model, stages, prompt):
    """K separate stage processes over encrypted loopback links give the single node's 32 tokens."""
    opened_models(model)  # installed, or the test fails naming `make models`
    command = [sys.executable, "-m", "swarm", "test-split", model, "--stages", str(stages)]
    command += ["--max-tokens", "32", "--prompt", prompt, "--json", "--data-dir", str(data_dir)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["identical"] is True, report
    assert len(report["single"]["token_ids"]) >= 8


def _start_node(*args: str) -> tuple[subprocess.Popen, str]:
    node = subprocess.Popen(
        [sys.executable, "-m", "swarm", "node", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return node, node.stdout.readline()


@pytest.mark.integration
def test_a_node_serves_what_it_holds_and_refuses_quarantined_layers(tiny_model, tmp_path):
    from swarm.shards import ShardSet, split_gguf

    shards = tmp_path / "shards"
    manifest = split_gguf(tiny_model("gemma3-tiny"), shards, shard_size_mb=0.05)
    assert len(manifest.shards) >= 3
    first = manifest.shards[0]
    (shards / first.file).unlink()  # this node holds every layer but the first shard's
    held = ShardSet.open(shards).layers_held()
    node, line = _start_node(str(shards), "--data-dir", str(tmp_path / "node"))
    try:
        assert line.startswith(f"layers {held[0][0]}-{held[0][1]} address 127.0.0.1:"), line
    finally:
        node.terminate()
        assert node.wait(timeout=30) == 0
    # A corrupted shard is quarantined, and asking for its layers is refused by name.
    second = manifest.shards[1]
    with open(shards / second.file, "r+b") as handle:
        handle.seek(5)
        byte = handle.read(1)
        handle.seek(5)
        handle.write(bytes([byte[0] ^ 0xFF]))
    node, line = _start_node(
        str(shards),
        "--layers",
        f"{second.layers[0]}-{second.layers[1]}",
        "--data-dir",
        str(tmp_path / "node"),
    )
    assert node.wait(timeout=120) != 0
    error = node.stderr.read()
    assert line == "" and "Traceback" not in error
    assert f"layer {second.layers[0]} is not held here" in error, error
    assert (shards / f"{second.file}.quarantine").exists()
