"""The node process: the model, its engine and the local socket the control plane uses.

`python -m swarm.node --data-dir DIR` loads the configured model in the background
(the socket answers `health` at once, with state "loading"), then serves
generations, token counts and embeddings through `swarm.node_server`. JAX lives
here and nowhere else; all device work runs on the scheduler's one thread.

`ModelBackend` turns a `GenerationRequest` into tokens: it renders chat messages
with the model's template (tools described in the system prompt, see
`swarm.tool_calls`), constrains the output when the caller forces a tool or asks
for a JSON object, and splits the text stream into text and tool-call events.

A node holds the layers `node.layers` names (all by default). Unless the config says
offline, it also serves them to peers as a pipeline stage and publishes them in the
DHT (`swarm.peering`). A node holding the whole model generates locally; one holding
part of it routes each request through peers, failing over when one drops out.

A request for another model that a peer serves whole is handed to that peer
(`swarm.delegation`), and a node holding its whole model takes such requests from
peers into its own scheduler, admitted by the requester's credit tier.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from swarm import paths
from swarm.config import Config, ConfigError, load_config
from swarm.delegation import (
    TIER_PRIORITY,
    DelegatedRun,
    NoHoldersError,
    PeerOverloadedError,
    PeerUnavailableError,
    positions_run,
    scheduled,
)
from swarm.errors import InvalidRequestError, UnavailableError, UnknownModelError
from swarm.generate import Prefilling, PromptReuse, check_prompt
from swarm.load_progress import LoadProgress
from swarm.node_protocol import SOCKET_NAME, GenerationRequest
from swarm.node_server import Detached, NodeServer, Scheduler
from swarm.schema_constraint import SchemaConstraint
from swarm.tool_calls import (
    ForcedToolCallStream,
    JsonObjectConstraint,
    ToolCallConstraint,
    ToolCallParser,
    new_call_id,
    template_messages,
)

log = logging.getLogger("swarm.node")

JSON_INSTRUCTION = "Reply with one JSON object and nothing else."
# Written after the generation prompt when a tool call is forced, so the model
# starts where a Hermes-style tool call would (see swarm.tool_calls).
FORCED_TOOL_PREFIX = "<tool_call>\n"


@dataclass
class Prepared:
    request: GenerationRequest
    model_id: str
    prompt_ids: list[int]
    max_tokens: int


class ModelBackend:
    """One whole model served from this node."""

    def __init__(self, model: str, data_dir: Path, config: Config):
        self.model_name = model
        self.data_dir = data_dir
        self.config = config
        self.state = "loading"
        self.error: str | None = None
        self.loaded_at: float | None = None
        self.opened: Any = None
        self.engine: Any = None
        self.generator: Any = None
        self.peering: Any = None
        # The node server's scheduler, which requests delegated by peers join.
        self.scheduler: Scheduler | None = None
        # How far loading is (`swarm.load_progress`), shown while the state is "loading".
        self.progress = LoadProgress(self.model_id, data_dir / "run")

    # -- loading ---------------------------------------------------------------

    def load(self) -> None:
        """Open the model and compile the common shapes; sets `state`."""
        from swarm.batching import SlotBatch
        from swarm.engine import EngineSettings, enable_compilation_cache
        from swarm.generate import Generator
        from swarm.loader import open_model
        from swarm.prefix_cache import PrefixCache

        progress = self.progress
        try:
            began = time.perf_counter()
            enable_compilation_cache(self.data_dir / "cache" / "xla")
            self.opened = open_model(self.model_name, self.data_dir)
            inference = self.config.inference
            settings = EngineSettings(
                weights=inference.weights,
                kv_cache=inference.kv_cache,
                layers=inference.layers,
                max_context=inference.max_context or None,
            )
            n_layers = self.opened.config.n_layers
            layers = parse_layers(self.config.node.layers, n_layers)
            progress.phase("weights", unit="bytes")
            self.engine = self.opened.engine(settings, layers, progress=progress.advance)
            progress.phase("compile")
            whole = layers == (0, n_layers)
            if whole:
                prefix = PrefixCache(inference.prefix_cache_mb * 2**20) if inference.prefix_cache_mb else None
                batch = None
                if inference.batch_context:
                    # Up to max_concurrent_requests sessions decode in one compiled step.
                    limit = min(inference.batch_context, self.engine.max_context)
                    batch = SlotBatch(self.engine, inference.max_concurrent_requests, limit)
                self.generator = Generator(self.engine, self.opened.tokenizer, prefix, batch)
                self._warm_up(inference.default_max_tokens)
            # Offline mode (pool.offline_mode) still peers, with LAN peers only: the DHT
            # process then reaches nobody but what mDNS finds.
            from swarm.identity import Identity
            from swarm.peering import Peering

            identity = Identity.load_or_create(self.data_dir)
            prefix_cache = self.generator.prefix_cache if whole else None
            self.peering = Peering(
                self.engine,
                self.opened,
                self.model_id,
                identity,
                self.config,
                self.data_dir,
                prefix_cache,
                delegate=self.serve_delegated if whole else None,
                batch=self.generator.batch if whole else None,
            )
            if prefix_cache is not None and self.config.network.prefix_sharing:
                self.generator.prefix_fetcher = self._prefix_fetcher(identity)
            if whole:  # serves its own requests at once; joins the swarm meanwhile
                threading.Thread(target=self._join_swarm, name="peering", daemon=True).start()
            else:
                progress.phase("peers")
                self.peering.start()
            progress.finish()
            self.loaded_at = time.time()
            self.state = "ready"
            log.info("model %s ready in %.1f s", self.model_id, time.perf_counter() - began)
        except Exception as error:
            log.exception("loading %s failed", self.model_name)
            self.error = f"{type(error).__name__}: {error}"
            self.state = "failed"

    def _prefix_fetcher(self, identity: Any) -> Any:
        from swarm.prefix_share import BlockLayout, PrefixFetcher

        engine, config = self.engine, self.opened.config
        layout = BlockLayout(
            engine.last - engine.first,
            config.n_kv_heads,
            config.head_dim,
            config.value_dim,
            engine.settings.kv_cache,
        )
        network = self.config.network
        return PrefixFetcher(
            identity, network.gossip_network_id, self.model_id, layout, self.peering.prefix_peers
        )

    def _join_swarm(self) -> None:
        try:
            self.peering.start()
        except Exception:
            log.exception("joining the swarm failed; serving local requests only")

    def _warm_up(self, max_tokens: int) -> None:
        """Compiles what a first short chat needs before saying ready: its prompt bucket
        and the decode step, at the cache size the default max_tokens gives; a batch
        then compiles its other programs in the background."""
        from swarm.sampling import SamplingParams

        text = self.opened.chat_template.render([{"role": "user", "content": "Hello!"}])
        warmup = self.opened.tokenizer.encode(text, add_bos=None, parse_special=True)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        steps = self.generator.stream(warmup, params)
        for _ in zip(range(2), steps, strict=False):
            pass
        steps.close()
        if self.generator.batch is not None:
            # In the background: the wider steps, and every chunk size a prompt is cut to.
            # Then the calls that run several arriving prompts together (a round takes in
            # up to one chunk's worth of them).
            self.generator.batch.warm_up_chunked(self.config.inference.prefill_chunk)

    @property
    def model_id(self) -> str:
        name = self.model_name
        if name.endswith(".gguf") or "/" in name:
            return Path(name).name.removesuffix(".gguf")
        return name

    def info(self) -> dict[str, Any]:
        model: dict[str, Any] = {"id": self.model_id, "state": self.state, "aliases": ["default"]}
        if self.error:
            model["error"] = self.error
        if self.engine is not None:
            config = self.opened.config
            engine = self.engine
            model.update(
                context_length=engine.max_context,
                architecture=config.architecture,
                n_layers=config.n_layers,
                layers=[engine.first, engine.last],
                embedding_length=config.d_model,
                vocab_size=config.vocab_size,
                loaded_at=self.loaded_at,
                routed=self.generator is None,
            )
        prefix = self.generator.prefix_cache if self.generator is not None else None
        if prefix is not None:
            stats = prefix.stats
            model["prefix_cache"] = {
                "blocks": len(prefix),
                "mb": round(prefix.nbytes / 2**20, 1),
                "bytes": prefix.nbytes,
                "budget_bytes": prefix.budget_bytes,
                "hits": stats.hits,
                "misses": stats.misses,
                "reused_tokens": stats.reused_tokens,
                "evicted_blocks": stats.evicted_blocks,
            }
            if self.generator.prefix_fetcher is not None:
                model["prefix_cache"]["from_peers"] = self.generator.prefix_fetcher.stats.as_dict()
        batch = self.generator.batch if self.generator is not None else None
        if batch is not None:
            # How full the shared decode batch is, and how many rows its steps carry.
            model["batch"] = {
                "slots": batch.slots,
                "in_use": batch.in_use(),
                "context": batch.max_capacity,
                **batch.stats.as_dict(),
            }
        info: dict[str, Any] = {"models": [model]}
        if self.peering is not None:
            info["peering"] = self.peering.info()
            # Models peers serve whole, which requests here are handed to.
            info["network_models"] = self.peering.network_models.listing(exclude=self.model_id)
        return info

    # -- requests ----------------------------------------------------------------

    def is_local(self, name: str) -> bool:
        """Whether a requested name means the served model (claude-* names do: Claude Code sends them)."""
        local = ("", "default", "auto", self.model_id, self.model_name, f"claude-swarm-{self.model_id}")
        return name in local or name.startswith("claude-")

    def resolve(self, name: str) -> str:
        """The served model for a requested name; UnknownModelError for any other."""
        if self.is_local(name):
            return self.model_id
        raise UnknownModelError(f"model {name!r} is not served by this node (it serves {self.model_id})")

    def _render(self, request: GenerationRequest) -> list[int]:
        tokenizer = self.opened.tokenizer
        if request.prompt is not None:
            return tokenizer.encode(request.prompt, add_bos=None, parse_special=False)
        tools = request.tools if request.tool_choice != "none" else ()
        messages = template_messages(list(request.messages or ()), list(tools))
        if request.response_format == "json_object" and not request.forced_tools:
            messages = _with_system_note(messages, JSON_INSTRUCTION)
        elif request.response_format == "json_schema" and not request.forced_tools:
            schema = json.dumps(request.json_schema, ensure_ascii=False)
            messages = _with_system_note(
                messages, f"{JSON_INSTRUCTION} It must match this JSON Schema: {schema}"
            )
        text = self.opened.chat_template.render(messages, add_generation_prompt=True)
        if request.forced_tools:
            text += FORCED_TOOL_PREFIX
        return tokenizer.encode(text, add_bos=None, parse_special=True)

    def prepare(self, request: GenerationRequest) -> Prepared | DelegatedRun:
        if not self.is_local(request.model):
            return self._delegated(request)
        model_id = self.resolve(request.model)
        try:
            prompt_ids = self._render(request)
        except ValueError as error:  # template_messages refusing a message
            raise InvalidRequestError(str(error)) from None
        max_tokens = check_prompt(self.engine, prompt_ids, request.sampling.max_tokens)
        if self.generator is None and (request.forced_tools or request.response_format != "text"):
            raise InvalidRequestError(
                "forced tool calls and JSON output need a node holding the whole model;"
                f" this node holds layers {self.engine.first}-{self.engine.last} and routes through peers"
            )
        return Prepared(request, model_id, prompt_ids, max_tokens)

    def _delegated(self, request: GenerationRequest) -> DelegatedRun:
        """A request for another model, for a peer serving it whole (see the module docstring)."""
        if self.peering is None:
            raise UnknownModelError(
                f"model {request.model!r} is not served by this node (it serves {self.model_id})"
                " and this node is not in a network"
            )
        try:
            return self.peering.delegated(request)
        except (NoHoldersError, PeerUnavailableError) as error:
            # The DHT out of reach too: what the caller asked for is not to be had here (a 404
            # that says why), rather than a 503 that a mistyped name would retry forever.
            raise UnknownModelError(
                f"model {request.model!r} is not served by this node (it serves {self.model_id}): {error}"
            ) from None

    def prompt_tokens(self, prepared: Prepared | DelegatedRun) -> int:
        if isinstance(prepared, DelegatedRun):
            return self._remote(prepared.count)
        return len(prepared.prompt_ids)

    def prompt_work(self, prepared: Prepared | DelegatedRun) -> int | None:
        """The prompt tokens this node will compute: those past the prefix its cache holds
        (None for a request run by peers)."""
        if isinstance(prepared, DelegatedRun) or self.generator is None:
            return None
        return len(prepared.prompt_ids) - self._cached(prepared)

    def _cached(self, prepared: Prepared) -> int:
        """The prompt tokens the prefix cache holds for `prepared` now."""
        prefix = self.generator.prefix_cache if self.generator is not None else None
        return prefix.cached_tokens(prepared.prompt_ids) if prefix is not None else 0

    def served_model(self, prepared: Prepared | DelegatedRun) -> str:
        return prepared.model_id

    def start(self, prepared: Prepared | DelegatedRun) -> dict[str, Any]:
        """The start event of a generation (a delegated one begins on the peer here)."""
        if isinstance(prepared, DelegatedRun):
            start = self._remote(prepared.start)
            return {
                "event": "start",
                "model": start["model"],
                "prompt_tokens": start["prompt_tokens"],
                "cached_tokens": start["cached_tokens"],
            }
        return {
            "event": "start",
            "model": prepared.model_id,
            "prompt_tokens": len(prepared.prompt_ids),
            "cached_tokens": self._cached(prepared),
        }

    @staticmethod
    def _remote(call: Any) -> Any:
        """A delegated request's call, its peers' refusals turned into this node's errors."""
        try:
            return call()
        except PeerOverloadedError as error:
            raise OverflowError(str(error)) from None
        except PeerUnavailableError as error:
            raise UnavailableError(str(error)) from None

    def run(self, prepared: Prepared | DelegatedRun) -> Iterator[dict[str, Any]]:
        if isinstance(prepared, DelegatedRun):
            # Closed before its first step (a full queue, a caller gone), it still lets go of the peer.
            return Detached(prepared.events(), on_close=prepared.close)
        events = self._events(prepared)
        return events if self.generator is not None else Detached(events)

    def serve_delegated(
        self, kind: str, request: GenerationRequest, requester_key: bytes, session_id: str
    ) -> Iterator[dict[str, Any]]:
        """A peer's request for this node's model (`swarm.delegation.serve`'s runner): the
        start event, and for a generation its events from this node's scheduler, where it
        waits its turn by the requester's credit tier."""
        from swarm.identity import peer_id_of

        if request.model != self.model_id:  # never handed on: one hop only
            raise UnknownModelError(f"this peer serves {self.model_id}, not {request.model!r}")
        credits = self.peering.credits if self.peering is not None else None
        tier = credits.tier(peer_id_of(requester_key)) if credits is not None else "silver"
        prepared = self.prepare(replace(request, priority=TIER_PRIORITY[tier]))
        assert isinstance(prepared, Prepared)
        start = self.start(prepared)
        if kind == "count":
            yield start
            return
        if self.scheduler is None:
            raise UnavailableError("this node is not taking requests yet")
        events = scheduled(self.scheduler, self.run(prepared), prepared.request.priority, start)
        try:
            for event in events:
                if event["event"] == "done" and credits is not None:  # counted before it is sent
                    layers = (0, self.opened.config.n_layers)
                    credits.served(session_id, requester_key, layers, positions_run(event))
                yield event
        finally:
            events.close()  # the requester gone: the generation stops at its next step

    def _events(self, prepared: Prepared) -> Iterator[dict[str, Any]]:
        request = prepared.request
        params = replace(request.sampling, max_tokens=prepared.max_tokens)
        if request.logprobs and not params.top_logprobs:
            params = replace(params, top_logprobs=1)
        constraint: Any = None
        forced: ForcedToolCallStream | None = None
        parser: ToolCallParser | None = None
        if request.forced_tools:
            # Each tool's parameters schema guides its arguments, so even a tiny model
            # fills in the declared fields instead of echoing the schema.
            schemas = {tool["name"]: tool["parameters"] for tool in request.tools}
            constraint = ToolCallConstraint(request.forced_tools, schemas=schemas)
            forced = ForcedToolCallStream(constraint)
        elif request.response_format == "json_schema":
            constraint = SchemaConstraint(request.json_schema)
        elif request.response_format == "json_object":
            constraint = JsonObjectConstraint()
        elif request.tools and request.tool_choice != "none":
            parser = ToolCallParser()
        call_ids: dict[int, str] = {}
        completion_tokens = 0
        finish = "length"
        stop_sequence = None
        pieces = self.generator.token_pieces() if forced else None
        reuse = PromptReuse()
        if self.generator is not None:
            # A long prompt advances a chunk per scheduler turn, between other requests' tokens.
            chunk = self.config.inference.prefill_chunk or None
            events = self.generator.stream(
                prepared.prompt_ids, params, constraint, prefill_chunk=chunk, reuse=reuse
            )
        else:
            events = self.peering.requester().stream(prepared.prompt_ids, params)
        for event in events:
            if isinstance(event, Prefilling):
                # A prompt chunk queued (the next turn runs it) or went in, or (waiting)
                # prefix blocks are awaited from peers.
                yield event.as_event()
                continue
            if isinstance(event, str):
                finish = event
                stop_sequence = getattr(event, "stop_sequence", None)
                break
            if event.token_id >= 0:
                completion_tokens += 1
            if forced is not None or parser is not None:
                if forced is not None:
                    piece = pieces[event.token_id] if event.token_id >= 0 else ""
                    found = forced.feed(piece)
                else:
                    found = parser.feed(event.text)
                answers = list(_tool_events(found, call_ids))
                yield from answers
                if not answers:
                    # A token with nothing to show yet (a tool call's text held back) still
                    # ends this turn: its next step then runs in the batch with everyone's.
                    yield {"event": "progress"}
            else:
                yield self._text_event(event.text, event, request.logprobs)
        if parser is not None:
            yield from _tool_events(parser.finish(), call_ids)
        if call_ids:
            finish = "tool_calls"
        yield {
            "event": "done",
            "finish_reason": finish,
            "stop_sequence": stop_sequence,
            "prompt_tokens": len(prepared.prompt_ids),
            "cached_tokens": reuse.tokens,
            "completion_tokens": completion_tokens,
        }

    def _text_event(self, text: str, event: Any, logprobs: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"event": "text", "text": text, "token_id": event.token_id}
        if logprobs and event.token_id >= 0:
            tokenizer = self.opened.tokenizer

            def entry(token_id: int, logprob: float) -> dict[str, Any]:
                raw = tokenizer.token_bytes(token_id)
                return {
                    "token": raw.decode("utf-8", errors="replace"),
                    "logprob": logprob,
                    "bytes": list(raw),
                }

            out.update(entry(event.token_id, event.logprob))
            out["top_logprobs"] = [entry(t, lp) for t, lp in event.top_logprobs]
        return out

    def embed(self, model: str, inputs: list[Any]) -> Iterator[dict[str, Any]]:
        model_id = self.resolve(model)
        if self.generator is None:
            raise InvalidRequestError(
                f"embeddings need a node holding the whole model; this node holds layers"
                f" {self.engine.first}-{self.engine.last}"
            )
        tokenizer = self.opened.tokenizer
        sequences = []
        for index, item in enumerate(inputs):
            if isinstance(item, str):
                ids = tokenizer.encode(item, add_bos=None, parse_special=False)
            elif isinstance(item, list) and all(isinstance(t, int) for t in item):
                ids = list(item)
            else:
                raise InvalidRequestError(f"input[{index}] must be a string or a list of token ids")
            if not ids:
                raise InvalidRequestError(f"input[{index}] is empty")
            check_prompt(self.engine, ids, 1)
            sequences.append(ids)
        engine = self.generator.engine
        embeddings = []
        for ids in sequences:
            embeddings.append([float(x) for x in engine.embed(ids)])
            yield {"event": "progress", "prompt": True}  # prompt work, like a prefill
        yield {
            "event": "result",
            "model": model_id,
            "embeddings": embeddings,
            "prompt_tokens": sum(len(ids) for ids in sequences),
        }


def parse_layers(text: str, n_layers: int) -> tuple[int, int]:
    """node.layers ("FIRST-LAST", end exclusive; empty = all) as a range of this model."""
    if not text.strip():
        return (0, n_layers)
    first, sep, last = text.strip().partition("-")
    if not sep or not first.isdigit() or not last.isdigit():
        raise InvalidRequestError(f"node.layers must look like FIRST-LAST (e.g. 0-10), not {text!r}")
    if not 0 <= int(first) < int(last) <= n_layers:
        raise InvalidRequestError(f"node.layers {text} is not a range within the model's {n_layers} layers")
    return (int(first), int(last))


def _with_system_note(messages: list[dict[str, str]], note: str) -> list[dict[str, str]]:
    if messages and messages[0]["role"] == "system":
        first = {"role": "system", "content": f"{messages[0]['content']}\n\n{note}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


def _tool_events(events: Sequence[tuple], call_ids: dict[int, str]) -> Iterator[dict[str, Any]]:
    """Node protocol events for swarm.tool_calls parser events."""
    for event in events:
        kind = event[0]
        if kind == "text" and event[1]:
            yield {"event": "text", "text": event[1], "token_id": -1}
        elif kind == "tool_call":
            call_ids[event[1]] = new_call_id()
            yield {"event": "tool_call", "index": event[1], "id": call_ids[event[1]], "name": event[2]}
        elif kind == "arguments" and event[2]:
            yield {"event": "arguments", "index": event[1], "delta": event[2]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swarm.node", description="serve a model to the control plane"
    )
    parser.add_argument("--data-dir")
    parser.add_argument("--model", help="model to serve (default: node.model from the config)")
    args = parser.parse_args(argv)
    data_dir = paths.data_dir(os.environ, args.data_dir)
    try:
        config = load_config(data_dir, os.environ, {"node.model": args.model})
    except ConfigError as error:
        print(f"swarm node: {error}", flush=True)
        return 2
    logging.basicConfig(
        level=config.logging.level.upper(), format="%(asctime)s %(levelname)s node %(name)s: %(message)s"
    )
    # JAX logs each accelerator backend it probes and does not find (a TPU, on every
    # other machine) at info: routine, so shown only when debugging.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    backend = ModelBackend(config.node.model, data_dir, config)
    server = NodeServer(
        data_dir / SOCKET_NAME,
        backend,
        max_active=config.inference.max_concurrent_requests,
        max_waiting=config.inference.max_queue,
        prompt_budget=config.inference.prefill_chunk,
    )
    backend.scheduler = server.scheduler
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, lambda signum, frame: _reload(backend, server, data_dir))
    server.serve_in_thread()
    log.info("node listening on %s; loading %s", data_dir / SOCKET_NAME, config.node.model)
    threading.Thread(target=backend.load, name="load", daemon=True).start()
    stopping.wait()
    log.info("node stopping")
    server.close()
    return 0


def _reload(backend: ModelBackend, server: NodeServer, data_dir: Path) -> None:
    """SIGHUP: re-read the config; queue limits and the prefill chunk apply at once, the rest
    at restart."""
    try:
        config = load_config(data_dir, os.environ)
    except ConfigError as error:
        log.error("config reload failed, keeping the old config: %s", error)
        return
    server.scheduler.max_active = config.inference.max_concurrent_requests
    server.scheduler.max_waiting = config.inference.max_queue
    server.scheduler.prompt_budget = config.inference.prefill_chunk  # as the next prompts are cut
    backend.config = config
    if backend.peering is not None:  # private mode and pool settings apply to the next route
        backend.peering.config = config
    log.info("config reloaded")


if __name__ == "__main__":
    raise SystemExit(main())
