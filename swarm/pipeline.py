"""The requester's side of a pipeline: embed locally, drive the chain of stages, open tokens.

Owns `Embedder` (only the token embedding table of a model, never its layers), `RouteStage`
(one entry of a route), and `Requester`, which generates through a route of stages covering
[0, L) as DESIGN.md §5 describes: the first stage sees hidden states, never token ids; the
last one returns each token sealed to the requester's key. Stop rules (end-of-generation
tokens, stop strings, max tokens) are those of `swarm.generate`. A stage that fails, refuses
or stalls raises `StageError` naming it.
"""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kernels.qtensor import QuantTensor
from kernels.quant_types import GGMLType
from swarm import wire
from swarm.credit_desk import CreditDesk
from swarm.errors import InvalidRequestError, SwarmError
from swarm.generate import GenerationResult, StopScanner, TokenEvent, collect
from swarm.gguf_file import GGUFFile
from swarm.identity import Identity
from swarm.model import embed
from swarm.model_config import ModelConfig
from swarm.sampling import SamplingParams
from swarm.secure_channel import ChannelError, SecureChannel
from swarm.tokenizer import Tokenizer

EMBEDDING = "token_embd.weight"


class StageError(SwarmError):
    """A stage of the route failed, refused the request, or did not answer in time.

    retriable: whether another route could succeed (a peer died, stalled or lost the
    session), as opposed to a refusal every route would repeat (a malformed request).
    """

    def __init__(self, message: str, *, retriable: bool = True, code: str = "") -> None:
        super().__init__(message)
        self.retriable = retriable
        self.code = code  # the stage's error code, when it answered with one


# Error codes a stage answers with that another route may not repeat.
RETRIABLE_CODES = frozenset(
    {"next_hop_failed", "unknown_session", "internal", "layer_mismatch", "overloaded"}
)
PROBE_TIMEOUT_S = 2.0
MAX_FAILOVERS = 8


class Embedder:
    """token ids -> hidden states, from the embedding table alone (scaled as the model does)."""

    def __init__(self, gguf: GGUFFile, config: ModelConfig) -> None:
        info = gguf.tensor_info(EMBEDDING)
        raw = np.asarray(gguf.tensor_bytes(EMBEDDING))
        if info.qtype == GGMLType.F32:
            self.table = jnp.asarray(raw.view(np.float32).reshape(info.shape))
        else:
            self.table = QuantTensor.from_packed(raw, info.qtype, (info.rows, info.ne[0]))
        self.config = config
        # The engine's own embedding program, so the first stage starts from the rows a
        # whole-model engine would.
        self._embed = jax.jit(partial(embed, config))

    def __call__(self, token_ids: Sequence[int]) -> np.ndarray:
        """i32[T] -> f32[T, d]."""
        return np.asarray(self._embed(self.table, np.asarray(token_ids, np.int32)))


# A stage of a route, as the requester sees it: the same record the wire carries.
RouteStage = wire.RouteHop


# Given {address: wall-clock time it was excluded}, a new route (records published after
# a peer's exclusion may use it again: it restarted).
Reroute = Callable[[Mapping[str, float]], Sequence[RouteStage]]


@dataclass
class Failover:
    """One recovery: which stages were dropped and how long until generation resumed."""

    reason: str
    excluded: list[str]
    replayed_tokens: int
    delay_ms: float = 0.0


class Requester:
    """Generates through a chain of stages; holds the token history and the sealing key.

    With `reroute`, a stage that dies, stalls past `timeout` or loses the session does not
    fail the request (DESIGN.md §5): the stages of the old route are probed, those that do
    not answer are excluded, `reroute({address: excluded at})` gives a new route (it may raise
    `NoRouteError` while none exists; it is asked again until `failover_timeout`), and the
    token history is replayed through it in the original chunks (the prompt, then one
    token at a time) so that every stage's KV cache, and the last stage's sampler, are
    rebuilt exactly: greedy output equals a run without the failure.
    """

    def __init__(
        self,
        identity: Identity,
        embedder: Embedder,
        tokenizer: Tokenizer,
        route: Sequence[RouteStage],
        *,
        model_id: str,
        network_id: str = "swarm-local",
        timeout: float = 60.0,
        compression: str = "f32",
        reroute: Reroute | None = None,
        failover_timeout: float = 120.0,
        credits: CreditDesk | None = None,
    ) -> None:
        self.identity = identity
        # Shows the stages our balance before a session and pays them after; None: no credits.
        self.credits = credits
        self.embedder = embedder
        self.tokenizer = tokenizer
        self.route = self._checked(route)
        self.model_id = model_id
        self.network_id = network_id
        self.timeout = timeout
        self.compression = compression
        self.reroute = reroute
        self.failover_timeout = failover_timeout
        self.failovers: list[Failover] = []
        self._excluded: dict[str, float] = {}

    def _checked(self, route: Sequence[RouteStage]) -> list[RouteStage]:
        n_layers = self.embedder.config.n_layers
        edge = 0
        for stage in route:
            if stage.layer_range[0] != edge:
                raise InvalidRequestError(f"route has a gap or overlap at layer {edge}: {stage.describe()}")
            edge = stage.layer_range[1]
        if not route or edge != n_layers:
            raise InvalidRequestError(f"route covers layers 0-{edge}, the model has {n_layers}")
        return list(route)

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[TokenEvent | str]:
        """Yields a TokenEvent per generated token, then the finish reason as a str."""
        vocab = self.embedder.config.vocab_size
        if not prompt_ids or any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequestError(f"the prompt must be a non-empty list of token ids in [0, {vocab})")
        budget = min(params.max_tokens, self.embedder.config.context_length - len(prompt_ids))
        if budget < 1:
            raise InvalidRequestError("the prompt fills the context window")
        link = _Link(self, params, len(prompt_ids) + budget)
        try:
            yield from self._steps(link, list(prompt_ids), budget, params)
        finally:
            link.close()

    def _steps(
        self, link: _Link, history: list[int], budget: int, params: SamplingParams
    ) -> Iterator[TokenEvent | str]:
        decoder = self.tokenizer.stream_decoder()
        scanner = StopScanner(params.stop)
        eog = frozenset() if params.ignore_eos else self.tokenizer.eog_ids
        for token in self._tokens(link, history, budget, eog):
            if token.token_id in eog:
                tail = scanner.push(decoder.flush()) + scanner.flush()
                if tail:
                    yield TokenEvent(-1, tail)
                yield "stop"
                return
            history.append(token.token_id)
            text = scanner.push(decoder.push(token.token_id))
            yield TokenEvent(token.token_id, text, list(token.top_logprobs), token.logprob)
            if scanner.stopped:
                yield "stop"
                return
        tail = scanner.push(decoder.flush()) + scanner.flush()
        if tail:
            yield TokenEvent(-1, tail)
        yield "length"

    def _tokens(
        self, link: _Link, history: list[int], budget: int, eog: frozenset[int]
    ) -> Iterator[wire.SampledToken]:
        """The generated tokens; the caller appends each to `history` before asking for the next.

        The prompt goes through the route as one chunk. After that, a route of one stage
        holding the whole model is handed the rest of the generation (a Generate: tokens
        stream back without a round trip each); a longer route is driven token by token.
        Either way a failure falls back to `_step_with_failover`.
        """
        prompt_length = len(history)
        produced = 0
        delegate = True
        while produced < budget:
            start = 0 if produced == 0 else len(history) - 1
            if delegate and produced and link.open and len(self.route) == 1:
                began = produced
                try:
                    for token in link.generate(start, budget - produced, eog):
                        produced += 1
                        yield token
                        if produced == budget or token.token_id in eog:
                            return
                    return
                except StageError as error:
                    if error.code == wire.BAD_MESSAGE and produced == began:
                        delegate = False  # a stage that cannot decode alone: drive it token by token
                        continue
                    self._recover(link, error, time.monotonic(), len(history) - 1)
                    continue
            yield self._step_with_failover(link, history, prompt_length, start)
            produced += 1

    def _step_with_failover(
        self, link: _Link, history: list[int], prompt_length: int, start: int
    ) -> wire.SampledToken:
        """The token after history[start:], fed through the route; recovers from failed stages."""
        recovery: Failover | None = None
        began = 0.0
        while True:
            try:
                if not link.open:
                    link.connect(self.route)
                    # Rebuild positions [0, start) in the chunks they were first fed in.
                    if start:
                        link.exchange(0, history[:prompt_length])
                        for position in range(prompt_length, start):
                            link.exchange(position, [history[position]])
                token = link.exchange(start, history[start:])
            except StageError as error:
                if recovery is None:
                    began = time.monotonic()
                recovery = self._recover(link, error, began, start)
                continue
            if recovery is not None:
                recovery.delay_ms = (time.monotonic() - began) * 1000.0
            return token

    def _recover(self, link: _Link, error: StageError, began: float, replay: int) -> Failover:
        """Drops the failed session and fails over to a new route; re-raises `error` when
        no other route could help (a refusal, no rerouting, too many failovers)."""
        link.close()
        if not error.retriable or self.reroute is None or len(self.failovers) >= MAX_FAILOVERS:
            raise error
        return self._fail_over(error, began, replay)

    def _fail_over(self, error: StageError, began: float, replay: int) -> Failover:
        """Excludes the stages that stopped answering and picks a new route."""
        from swarm.router import NoRouteError

        dead = [stage.address for stage in self.route if not self._answers(stage)]
        recovery = Failover(str(error), dead, replay)
        self.failovers.append(recovery)
        self._excluded.update(dict.fromkeys(dead, time.time()))
        deadline = began + self.failover_timeout
        while True:
            try:
                self.route = self._checked(self.reroute(dict(self._excluded)))
                return recovery
            except NoRouteError as no_route:
                if time.monotonic() >= deadline:
                    raise StageError(
                        f"{error}; no route to fail over to: {no_route}", retriable=False
                    ) from None
            time.sleep(0.5)

    def _answers(self, stage: RouteStage) -> bool:
        """Whether `stage` completes a handshake and answers a ping within PROBE_TIMEOUT_S."""
        return ping_stage(self.identity, self.network_id, stage.address, stage.public_key) is not None

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationResult:
        return collect(self.stream(prompt_ids, params), prompt_ids, params)


class _Link:
    """One session over one route: the channel to its first stage."""

    def __init__(self, requester: Requester, params: SamplingParams, max_context: int) -> None:
        self.requester = requester
        self.params = params
        self.max_context = max_context
        self.channel: SecureChannel | None = None
        self.session_id = ""
        self.first: RouteStage | None = None
        self.stages: list[RouteStage] = []
        self.positions = 0  # run by every stage of the route in this session: what it is paid for

    @property
    def open(self) -> bool:
        return self.channel is not None

    def connect(self, route: Sequence[RouteStage]) -> None:
        requester = self.requester
        first = route[0]
        self.first = first
        self.stages = list(route)
        self.positions = 0
        self.session_id = uuid.uuid4().hex
        if requester.credits is not None:
            requester.credits.introduce(self.stages)
        try:
            self.channel = SecureChannel.connect(
                first.address,
                requester.identity,
                requester.network_id,
                expected_peer=first.public_key,
                timeout=requester.timeout,
            )
        except ChannelError as error:
            raise StageError(f"{first.describe()}: {error}") from error
        self._send(
            wire.OpenSession(
                self.session_id,
                requester.model_id,
                first.layer_range,
                self.params.to_dict(),
                requester.identity.public_key,
                requester.compression,
                self.max_context,
                tuple(route[1:]),
            )
        )

    def exchange(self, start: int, token_ids: Sequence[int]) -> wire.SampledToken:
        """Feeds `token_ids` at positions start.. and returns the token sampled after them."""
        requester = self.requester
        hidden = requester.embedder(token_ids)
        self._send(wire.Forward(self.session_id, start, hidden, requester.compression))
        token = self._receive_token(start + len(token_ids))
        self.positions += len(token_ids)
        return token

    def generate(self, start: int, max_tokens: int, eog: frozenset[int]) -> Iterator[wire.SampledToken]:
        """Has the one whole-model stage decode from position `start` on its own."""
        self._send(wire.Generate(self.session_id, start, max_tokens, tuple(sorted(eog))))
        for position in range(start + 1, start + max_tokens + 1):
            token = self._receive_token(position)
            self.positions += 1
            yield token
            if token.token_id in eog:
                return

    def _send(self, message: wire.Message) -> None:
        assert self.channel is not None and self.first is not None
        try:
            self.channel.send(wire.encode(message))
        except ChannelError as error:
            raise StageError(f"{self.first.describe()}: {error}") from error

    def _receive_token(self, position: int) -> wire.SampledToken:
        assert self.channel is not None and self.first is not None
        first = self.first
        try:
            reply = wire.decode(self.channel.recv(timeout=self.requester.timeout))
        except (ChannelError, wire.WireError) as error:
            raise StageError(f"{first.describe()}: {error}") from error
        if isinstance(reply, wire.Error):
            raise StageError(
                f"{reply.code}: {reply.message}", retriable=reply.code in RETRIABLE_CODES, code=reply.code
            )
        if not isinstance(reply, wire.TokenResult) or reply.session_id != self.session_id:
            raise StageError(f"{first.describe()}: unexpected {type(reply).__name__}")
        if reply.position != position:
            raise StageError(f"{first.describe()}: token for position {reply.position}, expected {position}")
        try:
            return wire.open_token(self.requester.identity, reply)
        except wire.WireError as error:
            raise StageError(f"{first.describe()}: {error}") from error

    def close(self) -> None:
        if self.channel is not None:
            with contextlib.suppress(ChannelError):
                self.channel.send(wire.encode(wire.Close(self.session_id)), timeout=1.0)
            self.channel.close()
            credits = self.requester.credits
            if credits is not None and self.positions:
                credits.settle(self.session_id, self.stages, self.positions)
        self.channel = None
        self.positions = 0


def ping_stage(
    identity: Identity,
    network_id: str,
    address: str,
    public_key: bytes | None,
    timeout: float = PROBE_TIMEOUT_S,
) -> float | None:
    """Milliseconds of an encrypted Ping/Pong round trip to the stage at `address` (the
    handshake not counted), or None if it does not complete one within `timeout`."""
    try:
        channel = SecureChannel.connect(
            address, identity, network_id, expected_peer=public_key, timeout=timeout
        )
    except ChannelError:
        return None
    try:
        began = time.perf_counter()
        channel.send(wire.encode(wire.Ping(1, time.time())), timeout=timeout)
        if isinstance(wire.decode(channel.recv(timeout=timeout)), wire.Pong):
            return (time.perf_counter() - began) * 1000.0
        return None
    except (ChannelError, wire.WireError):
        return None
    finally:
        channel.close()


# --- a local split check: K stage processes on loopback against one engine --------------


def _read_first_line(process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline()
            if line:
                return line
        if process.poll() is not None:
            break
    process.kill()
    _, stderr = process.communicate(timeout=10)
    raise StageError(f"stage process {process.args[4:7]} did not start: {stderr.strip()[-500:]}")


def _start_node(model_dir: Path, layers: tuple[int, int], data_dir: Path, settings, model_id: str):
    command = [sys.executable, "-m", "swarm", "node", str(model_dir), "--layers", f"{layers[0]}-{layers[1]}"]
    command += ["--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--model-id", model_id]
    command += ["--weights", settings.weights]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _parse_node_line(line: str) -> RouteStage:
    fields = line.split()
    values = dict(zip(fields[::2], fields[1::2], strict=False))
    first, _, last = values["layers"].partition("-")
    return RouteStage(values["address"], bytes.fromhex(values["public_key"]), (int(first), int(last)))


def _timed(events: Iterator[TokenEvent | str]) -> tuple[list[int], float]:
    """Token ids of a stream and its decode rate (tokens after the first over their time)."""
    stamps: list[float] = []
    ids: list[int] = []
    for event in events:
        if isinstance(event, str):
            break
        if event.token_id >= 0:
            stamps.append(time.perf_counter())
            ids.append(event.token_id)
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return ids, (len(stamps) - 1) / span if span > 0 else 0.0


def run_split_check(
    model_name: str, data_dir: Path, settings, stages: int, prompt: str, max_tokens: int
) -> dict:
    """Greedy generation through `stages` node processes and through one engine, compared.

    The model is sharded into a temporary directory, each node gets only its own shards
    and data directory; the nodes are always stopped. Each side runs once to compile,
    then once timed.
    """
    from swarm.generate import Generator
    from swarm.loader import open_model
    from swarm.router import even_split
    from swarm.shards import MIB, link_shards, select_shards, split_gguf

    model = open_model(model_name, data_dir)
    if model.path.is_dir():
        raise InvalidRequestError("test-split takes a .gguf model, not a shard directory")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    prompt_ids = model.tokenizer.encode(prompt, add_bos=None, parse_special=False)
    n_layers = model.config.n_layers
    splits = even_split(n_layers, stages)
    model_id = model_id_of(model)
    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="swarm-split-") as scratch:
        root = Path(scratch)
        shard_size_mb = max(model.path.stat().st_size / (2 * n_layers) / MIB, 0.001)
        manifest = split_gguf(model.path, root / "shards", shard_size_mb=shard_size_mb)
        try:
            for index, layers in enumerate(splits):
                stage_dir = link_shards(
                    root / "shards", select_shards(manifest, layers), root / f"stage{index}"
                )
                processes.append(_start_node(stage_dir, layers, root / f"node{index}", settings, model_id))
            route = [_parse_node_line(_read_first_line(process, 300.0)) for process in processes]
            requester = Requester(
                Identity.generate(),
                Embedder(model.gguf, model.config),
                model.tokenizer,
                route,
                model_id=model_id,
                timeout=300.0,
            )
            _timed(requester.stream(prompt_ids, params))
            split_ids, split_rate = _timed(requester.stream(prompt_ids, params))
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.communicate()
    generator = Generator(model.engine(settings), model.tokenizer)
    _timed(generator.stream(prompt_ids, params))
    single_ids, single_rate = _timed(generator.stream(prompt_ids, params))
    return {
        "identical": single_ids == split_ids,
        "single": {"token_ids": single_ids, "decode_tok_s": single_rate},
        "split": {"token_ids": split_ids, "decode_tok_s": split_rate},
    }


def model_id_of(model) -> str:
    """The name stages and requesters agree on for a model: its general.name, else the file stem."""
    return str(model.gguf.metadata.get("general.name") or model.path.stem)
