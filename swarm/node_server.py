"""The node's local socket server and its scheduler, over any `Backend`.

Owns the unix socket the control plane talks to, one thread per connection, and
one scheduler thread that does all device work. The scheduler keeps up to
`max_active` generations open and advances them in turn, one step each, so a long
generation never holds up a short one; of those still taking in their prompt, the first
admitted steps each round, and the next ones too while their prompts fit in what is left
of one prefill chunk (`prompt_budget` tokens), so arriving prompts never stall the running
generations' tokens for more than one chunk, and a burst of short prompts goes in at once
instead of one per round; extra requests wait in a bounded queue (full: `overloaded`).
Each generation's events go into its own queue, so a slow reader never stalls the
scheduler; a reader that hangs up cancels its generation at the next step.

The backend (the real one is `swarm.node.ModelBackend`; tests use a mock) knows the
model; this module knows only the protocol. Must not import jax.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import socketserver
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from swarm.errors import ContextOverflowError, SwarmError, UnavailableError, UnknownModelError
from swarm.node_protocol import GenerationRequest, ProtocolError, encode, read_message

log = logging.getLogger("swarm.node")


class Backend(Protocol):
    """What the server needs from a model host."""

    state: str  # "loading" | "ready" | "failed"

    def info(self) -> dict[str, Any]: ...

    def prepare(self, request: GenerationRequest) -> Any:
        """Validate and tokenize (no device work); raises SwarmError subclasses."""

    def prompt_tokens(self, prepared: Any) -> int: ...

    def prompt_work(self, prepared: Any) -> int | None:
        """The prompt tokens this node will compute (past a cached prefix), for the
        scheduler to pack arriving prompts by; None if not known."""

    def served_model(self, prepared: Any) -> str: ...

    def start(self, prepared: Any) -> dict[str, Any]:
        """The generation's start event (model, prompt_tokens); may begin it."""

    def run(self, prepared: Any) -> Iterator[dict[str, Any]]:
        """Events after `start`, ending with `done`; each next() is one step of device work.
        While the prompt goes in, those steps yield {"event": "progress", "prompt": true},
        with "queued": true where the step only queued a prompt chunk (the next step
        runs it, with the chunks other generations queued meanwhile: the scheduler
        gives that next step once the round's other prompts had their turn), or
        "waiting": true while prefix blocks are awaited from peers; after it, every
        decode step yields at least one event (a plain progress when it has nothing to
        show)."""

    def embed(self, model: str, inputs: list[Any]) -> Iterator[dict[str, Any]]:
        """One-shot device work yielding a single answer dict."""


def error_event(error: BaseException) -> dict[str, Any]:
    if isinstance(error, ContextOverflowError):
        code = "context_overflow"
    elif isinstance(error, UnknownModelError):
        code = "unknown_model"
    elif isinstance(error, UnavailableError):
        code = "unavailable"
    elif isinstance(error, SwarmError):
        code = "invalid_request"
    else:
        code = "internal"
    message = str(error) if code != "internal" else f"internal error: {type(error).__name__}: {error}"
    return {"event": "error", "code": code, "message": message}


class Detached:
    """A backend run whose steps wait on the network, not on this node's device (a request
    routed through peers): the scheduler gives it a thread of its own instead of a turn in
    the round robin, so it never holds up local generations."""

    def __init__(self, events: Iterator[dict[str, Any]], on_close: Any = None):
        self.events = events
        self.on_close = on_close  # called on close too: a generator never started skips its finally

    def __iter__(self) -> Detached:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self.events)

    def close(self) -> None:
        _close(self.events)
        if self.on_close is not None:
            self.on_close()


@dataclass
class Job:
    events: Iterator[dict[str, Any]]
    output: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.monotonic)
    priority: int = 0  # waiting jobs are admitted highest first, then in arrival order
    # Has produced an event other than a prompt chunk's progress ({"event": "progress",
    # "prompt": true}): its prompt is in and each turn is now one decode step.
    past_prompt: bool = False
    # Its last event was {"event": "progress", "prompt": true, "waiting": true}: its prompt
    # awaits peers (prefix blocks), and its turns are polls that do no device work.
    waiting: bool = False
    # Prompt tokens still to go in (None: not known, as if each turn took a whole chunk);
    # a round fits as many prompt turns into one chunk's worth of tokens as it can.
    prompt_left: int | None = None
    # The prompt tokens each of its turns takes in: the scheduler's prompt_budget when it
    # was submitted (a node's prefill chunk as the job's generation cuts its prompt), so
    # a budget changed meanwhile does not miscount it; 0: the whole prompt at once.
    prompt_chunk: int | None = None
    # Its last event was {"event": "progress", "prompt": true, "queued": true}: its turn
    # queued a prompt chunk, which its next turn runs (with the others queued by then).
    queued: bool = False

    def __post_init__(self) -> None:
        # A count from a start event (a peer's, for delegated work): anything but a
        # whole number of tokens is not known.
        left = self.prompt_left
        if not isinstance(left, int) or isinstance(left, bool) or left < 0:
            self.prompt_left = None


@dataclass
class SchedulerStats:
    active: int = 0
    waiting: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    generated_tokens: int = 0


class Scheduler:
    """Round-robin over active jobs on one thread (at most one prefill chunk's worth of
    prompt tokens per round, see `_round`); the only place device work runs.

    prompt_budget: the prompt tokens one turn of a job takes in (a node's
    `inference.prefill_chunk`), and so the most a round's prompt turns take together;
    0: prompts go in whole, one per round.
    """

    def __init__(self, max_active: int, max_waiting: int, prompt_budget: int = 0):
        self.max_active = max_active
        self.max_waiting = max_waiting
        self.prompt_budget = prompt_budget
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._detached = 0
        self.stats = SchedulerStats()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if isinstance(job.events, Detached):
            with self._wake:
                if self._detached >= self.max_active + self.max_waiting:
                    raise OverflowError("the node's queue is full")
                self._detached += 1
                self.stats.active += 1
            threading.Thread(target=self._run_detached, args=(job,), name="routed", daemon=True).start()
            return
        if job.prompt_chunk is None:
            job.prompt_chunk = self.prompt_budget
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                # Requests whose readers hung up while waiting hold no place in the queue.
                for gone in [job for job in self._waiting if job.cancelled.is_set()]:
                    self._waiting.remove(gone)
                    self.stats.cancelled += 1
                    _close(gone.events)
            if len(self._waiting) >= self.max_waiting and len(self._active) >= self.max_active:
                raise OverflowError("the node's queue is full")
            self._waiting.append(job)
            self.stats.waiting = len(self._waiting)
            self._wake.notify()

    def _run_detached(self, job: Job) -> None:
        try:
            while self._step(job):
                pass
        finally:
            with self._wake:
                self._detached -= 1
                self.stats.active -= 1

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=5)

    def _admit(self) -> None:
        with self._wake:
            while not self._active and not self._waiting and not self._stopping:
                self._wake.wait()
            while self._waiting and len(self._active) < self.max_active:
                chosen = max(self._waiting, key=lambda job: job.priority)  # the first of the highest
                self._waiting.remove(chosen)
                self._active.append(chosen)
            self.stats.active = len(self._active) + self._detached
            self.stats.waiting = len(self._waiting)

    def _step(self, job: Job) -> bool:
        """Advance one job by one event; False when it is over."""
        if job.cancelled.is_set():
            with self._wake:
                self.stats.cancelled += 1
            _close(job.events)
            return False
        try:
            event = next(job.events)
        except StopIteration:
            event = {"event": "error", "code": "internal", "message": "generation ended without a result"}
        except Exception as error:  # a failed generation must not take the node down
            log.exception("generation failed")
            event = error_event(error)
        kind = event.get("event")
        prompt = kind == "progress" and bool(event.get("prompt"))
        job.waiting = prompt and bool(event.get("waiting"))
        job.queued = prompt and bool(event.get("queued"))
        if not prompt:
            job.past_prompt = True
        if kind == "text" and event.get("token_id", -1) >= 0:
            self.stats.generated_tokens += 1
        if kind in ("done", "error", "result"):
            # Counted before the reader hears of it: whoever saw the answer sees the count.
            if kind == "error":
                self.stats.failed += 1
            else:
                self.stats.completed += 1
            # The run's own ending (a pipeline session's Close and the receipts it pays the
            # stages with) happens before the reader hears the answer too: whoever saw the
            # answer sees the balance it spent.
            try:
                _close(job.events)
            except Exception:  # the answer itself stands
                log.exception("ending a finished generation failed")
            job.output.put(event)
            return False
        job.output.put(event)
        return True

    def _round(self) -> None:
        """One turn for every job past its prompt, and prompt turns for those still in it.

        A turn of a job in its prompt is a whole prefill chunk (`prompt_budget` tokens, or
        what is left of its prompt), one past it a decode step that all of them share.
        The first admitted prompt takes a turn every round; the later ones join it while
        their turns fit in what is left of one chunk's worth of tokens, so a running
        generation waits for at most one chunk's worth of prompt between two of its
        tokens, however many requests arrive at once, and eight short prompts arriving
        together go in in one round. A prompt turn that only queued its chunk ({"event":
        "progress", "prompt": true, "queued": true}) takes a second turn once every
        chosen prompt has had its first: the first of those runs all the queued chunks,
        in one call where their rows allow. A job awaiting prefix blocks from peers polls
        every round and holds no prompt turn meanwhile.
        """

        def holds_back(job: Job) -> bool:  # a prompt chunk to run, not a cancellation or a poll
            return not job.past_prompt and not job.waiting and not job.cancelled.is_set()

        prompts = [job for job in self._active if holds_back(job)]
        in_prompt = {id(job) for job in prompts}
        over: set[int] = set()
        for job in self._active:  # the decode steps (and cancellations, and polls)
            if id(job) not in in_prompt and not self._step(job):
                over.add(id(job))
        chosen = self._prompt_turns(prompts)
        for job in chosen:  # each queues its chunk (or runs it, where a backend does not queue)
            if not self._step(job):
                over.add(id(job))
        for job in chosen:  # then the queued chunks run, and each job takes its answer
            if id(job) not in over and job.queued and not self._step(job):
                over.add(id(job))
            if job.prompt_left is not None and not job.waiting:
                job.prompt_left = max(0, job.prompt_left - job.prompt_chunk) if job.prompt_chunk else 0
        kept = [job for job in self._active if id(job) not in over]
        self._active = kept
        if kept and all(job.waiting for job in kept):
            time.sleep(0.001)  # only answers from peers awaited: no spinning meanwhile

    def _prompt_turns(self, prompts: list[Job]) -> list[Job]:
        """Of the jobs with a prompt chunk to run (in admission order, which went by
        priority), those that run it this round: the first, which never starves behind
        later arrivals, then each later one whose turn fits in the tokens left."""
        budget = self.prompt_budget
        chosen: list[Job] = []
        room = budget
        for job in prompts:
            turn = min(job.prompt_chunk, budget) if job.prompt_chunk else budget
            size = turn if job.prompt_left is None else min(job.prompt_left, turn)
            if chosen and size > room:
                continue
            chosen.append(job)
            room -= size
            if room <= 0:
                break
        return chosen

    def _loop(self) -> None:
        while True:
            self._admit()
            if self._stopping:
                for job in [*self._active, *self._waiting]:
                    job.output.put(
                        {"event": "error", "code": "unavailable", "message": "the node is stopping"}
                    )
                return
            self._round()
            with self._wake:
                self.stats.active = len(self._active) + self._detached


def _close(events: Iterator[Any]) -> None:
    close = getattr(events, "close", None)
    if close:
        close()


class _Handler(socketserver.StreamRequestHandler):
    server: NodeServer

    def handle(self) -> None:
        try:
            message = read_message(self.rfile)
        except ProtocolError as error:
            self._send(error_event(error))
            return
        if message is None:
            return
        op = message.get("op")
        node = self.server
        try:
            if op == "health":
                self._send(node.health())
            elif op == "info":
                self._send({**node.backend.info(), **node.health()})
            elif op == "count_tokens":
                self._require_ready()
                prepared = node.backend.prepare(GenerationRequest.from_dict(message.get("request")))
                self._send({"prompt_tokens": node.backend.prompt_tokens(prepared)})
            elif op == "embed":
                self._require_ready()
                inputs = message.get("inputs")
                if not isinstance(inputs, list) or not inputs:
                    raise ProtocolError("inputs must be a non-empty list")
                self._stream(node.backend.embed(str(message.get("model", "")), inputs))
            elif op == "generate":
                self._require_ready()
                request = GenerationRequest.from_dict(message.get("request"))
                prepared = node.backend.prepare(request)
                start = node.backend.start(prepared)
                work = getattr(node.backend, "prompt_work", None)
                left = work(prepared) if work is not None else start.get("prompt_tokens")
                self._stream(node.backend.run(prepared), start, request.priority, left)
            else:
                raise ProtocolError(f"unknown op {op!r}")
        except OverflowError as error:
            self._send({"event": "error", "code": "overloaded", "message": str(error)})
        except _NotReady as error:
            self._send({"event": "error", "code": "unavailable", "message": str(error)})
        except Exception as error:
            if not isinstance(error, SwarmError):
                log.exception("request failed")
            self._send(error_event(error))

    def _require_ready(self) -> None:
        state = self.server.backend.state
        if state != "ready":
            raise _NotReady(f"the model is not ready ({state})")

    def _send(self, message: dict[str, Any]) -> bool:
        try:
            self.wfile.write(encode(message))
            self.wfile.flush()
            return True
        except OSError:
            return False

    def _peer_gone(self) -> bool:
        """True when the client has hung up (readable with nothing to read)."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _stream(
        self,
        events: Iterator[dict[str, Any]],
        start: dict[str, Any] | None = None,
        priority: int = 0,
        prompt_left: Any = None,
    ) -> None:
        """Runs `events` as a scheduler job, sending `start` and then its answers;
        `prompt_left`: the prompt tokens it will compute, if known."""
        job = Job(events, priority=priority, prompt_left=prompt_left)
        try:
            self.server.scheduler.submit(job)
        except OverflowError:
            _close(events)  # a run that never starts lets go of what it holds (a peer's channel)
            raise
        if start is not None and not self._send(start):
            job.cancelled.set()
            return
        while True:
            try:
                event = job.output.get(timeout=0.5)
            except queue.Empty:
                if self._peer_gone():
                    job.cancelled.set()
                    return
                continue
            if event.get("event") == "progress":
                continue  # device work between answers; nothing to tell the client
            if not self._send(event):
                job.cancelled.set()
                return
            if event.get("event") in ("done", "error", "result"):
                return


class _NotReady(Exception):
    pass


class NodeServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves `backend` on a unix socket at `path` (mode 0600)."""

    daemon_threads = True

    def __init__(
        self,
        path: Path,
        backend: Backend,
        *,
        max_active: int = 8,
        max_waiting: int = 256,
        prompt_budget: int = 0,
    ):
        self.path = Path(path)
        self.backend = backend
        self.started = time.time()
        self.scheduler = Scheduler(max_active, max_waiting, prompt_budget)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            super().__init__(str(self.path), _Handler)
        finally:
            os.umask(old_umask)

    def health(self) -> dict[str, Any]:
        stats = self.scheduler.stats
        loading = self.backend.state == "loading" and getattr(self.backend, "progress", None) is not None
        return {
            "state": self.backend.state,
            **({"load": self.backend.progress.snapshot()} if loading else {}),
            "model": getattr(self.backend, "model_id", None),
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "queue": {"active": stats.active, "waiting": stats.waiting},
            "totals": {
                "completed": stats.completed,
                "cancelled": stats.cancelled,
                "failed": stats.failed,
                "generated_tokens": stats.generated_tokens,
            },
        }

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="node-socket", daemon=True
        )
        thread.start()
        return thread

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.scheduler.stop()
        self.path.unlink(missing_ok=True)
