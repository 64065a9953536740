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
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from kernels import ops
from kernels.qtensor import QuantTensor
from kernels.quant_types import GGMLType
from swarm import wire
from swarm.errors import InvalidRequestError, SwarmError
from swarm.generate import GenerationResult, TokenEvent, _StopScanner
from swarm.gguf_file import GGUFFile
from swarm.identity import Identity, peer_id_of
from swarm.model_config import ModelConfig
from swarm.sampling import SamplingParams
from swarm.secure_channel import ChannelError, SecureChannel
from swarm.tokenizer import Tokenizer

EMBEDDING = "token_embd.weight"


class StageError(SwarmError):
    """A stage of the route failed, refused the request, or did not answer in time."""


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
        scale = config.embedding_scale

        def embed(ids: jax.Array) -> jax.Array:
            rows = ops.take_rows(self.table, ids)
            return rows * jnp.float32(scale) if scale != 1.0 else rows

        self._embed = jax.jit(embed)

    def __call__(self, token_ids: Sequence[int]) -> np.ndarray:
        """i32[T] -> f32[T, d]."""
        return np.asarray(self._embed(jnp.asarray(np.asarray(token_ids, np.int32))))


@dataclass(frozen=True)
class RouteStage:
    """One stage of a route: where it listens, its identity key, the layers it runs."""

    address: str  # "host:port"
    public_key: bytes
    layer_range: tuple[int, int]

    def describe(self) -> str:
        first, last = self.layer_range
        return f"stage {peer_id_of(self.public_key)} at {self.address} (layers {first}-{last})"

    def hop(self) -> wire.RouteHop:
        return wire.RouteHop(self.address, self.public_key, self.layer_range)


class Requester:
    """Generates through a chain of stages; holds the token history and the sealing key."""

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
        compression: str = "f16",
    ) -> None:
        n_layers = embedder.config.n_layers
        edge = 0
        for stage in route:
            if stage.layer_range[0] != edge:
                raise InvalidRequestError(f"route has a gap or overlap at layer {edge}: {stage.describe()}")
            edge = stage.layer_range[1]
        if not route or edge != n_layers:
            raise InvalidRequestError(f"route covers layers 0-{edge}, the model has {n_layers}")
        self.identity = identity
        self.embedder = embedder
        self.tokenizer = tokenizer
        self.route = list(route)
        self.model_id = model_id
        self.network_id = network_id
        self.timeout = timeout
        self.compression = compression

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[TokenEvent | str]:
        """Yields a TokenEvent per generated token, then the finish reason as a str."""
        vocab = self.embedder.config.vocab_size
        if not prompt_ids or any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequestError(f"the prompt must be a non-empty list of token ids in [0, {vocab})")
        budget = min(params.max_tokens, self.embedder.config.context_length - len(prompt_ids))
        if budget < 1:
            raise InvalidRequestError("the prompt fills the context window")
        first = self.route[0]
        session_id = uuid.uuid4().hex
        try:
            channel = SecureChannel.connect(
                _host_port(first.address),
                self.identity,
                self.network_id,
                expected_peer=first.public_key,
                timeout=self.timeout,
            )
        except ChannelError as error:
            raise StageError(f"{first.describe()}: {error}") from error
        try:
            self._send(
                channel,
                wire.OpenSession(
                    session_id,
                    self.model_id,
                    first.layer_range,
                    params.to_dict(),
                    self.identity.public_key,
                    self.compression,
                    len(prompt_ids) + budget,
                    tuple(stage.hop() for stage in self.route[1:]),
                ),
            )
            yield from self._steps(channel, session_id, list(prompt_ids), budget, params)
        finally:
            with contextlib.suppress(ChannelError):
                channel.send(wire.encode(wire.Close(session_id)), timeout=1.0)
            channel.close()

    def _steps(
        self, channel: SecureChannel, session_id: str, history: list[int], budget: int, params: SamplingParams
    ) -> Iterator[TokenEvent | str]:
        decoder = self.tokenizer.stream_decoder()
        scanner = _StopScanner(params.stop)
        eog = frozenset() if params.ignore_eos else self.tokenizer.eog_ids
        pending, start = history, 0
        for _ in range(budget):
            self._send(channel, wire.Forward(session_id, start, self.embedder(pending), self.compression))
            token = self._receive_token(channel, session_id, start + len(pending))
            start += len(pending)
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
            pending = [token.token_id]
        tail = scanner.push(decoder.flush()) + scanner.flush()
        if tail:
            yield TokenEvent(-1, tail)
        yield "length"

    def _send(self, channel: SecureChannel, message: wire.Message) -> None:
        try:
            channel.send(wire.encode(message))
        except ChannelError as error:
            raise StageError(f"{self.route[0].describe()}: {error}") from error

    def _receive_token(self, channel: SecureChannel, session_id: str, position: int) -> wire.SampledToken:
        first = self.route[0]
        try:
            reply = wire.decode(channel.recv(timeout=self.timeout))
        except (ChannelError, wire.WireError) as error:
            raise StageError(f"{first.describe()}: {error}") from error
        if isinstance(reply, wire.Error):
            raise StageError(f"{reply.code}: {reply.message}")
        if not isinstance(reply, wire.TokenResult) or reply.session_id != session_id:
            raise StageError(f"{first.describe()}: unexpected {type(reply).__name__}")
        if reply.position != position:
            raise StageError(f"{first.describe()}: token for position {reply.position}, expected {position}")
        try:
            return wire.open_token(self.identity, reply)
        except wire.WireError as error:
            raise StageError(f"{first.describe()}: {error}") from error

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationResult:
        result = GenerationResult(prompt_token_ids=list(prompt_ids))
        pieces = []
        for event in self.stream(prompt_ids, params):
            if isinstance(event, str):
                result.finish_reason = event
                break
            pieces.append(event.text)
            if event.token_id >= 0:
                result.token_ids.append(event.token_id)
                if params.top_logprobs:
                    result.top_logprobs.append(event.top_logprobs)
        result.text = "".join(pieces)
        return result


def _host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def timed_generate(
    requester: Requester, prompt_ids: Sequence[int], params: SamplingParams
) -> tuple[list[int], float]:
    """Token ids and decode tokens per second (tokens after the first over their time)."""
    stamps: list[float] = []
    ids: list[int] = []
    for event in requester.stream(prompt_ids, params):
        if isinstance(event, str):
            break
        if event.token_id >= 0:
            stamps.append(time.perf_counter())
            ids.append(event.token_id)
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else 0.0
    return ids, rate
