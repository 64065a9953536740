"""The node's scheduler with stand-in generations: admission by priority, fair turns,
cancellation, and routed (detached) runs that never hold up local ones."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

from swarm.node_server import Detached, Job, Scheduler


def generation(
    name: str, steps: int, trace: list[str], gate: threading.Event | None = None
) -> Iterator[dict]:
    if gate is not None:
        gate.wait(10)
    for step in range(steps):
        trace.append(name)
        yield {"event": "text", "text": f"{name}{step}", "token_id": step}
    yield {"event": "done", "finish_reason": "length"}


def finish(job: Job, timeout: float = 10.0) -> list[dict]:
    events = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = job.output.get(timeout=timeout)
        events.append(event)
        if event["event"] in ("done", "error"):
            return events
    raise AssertionError("the job did not finish")


def held_by_a_blocker(scheduler: Scheduler, trace: list[str]) -> tuple[Job, threading.Event]:
    """Submits a job whose first turn waits for the returned gate: until it is set, the
    scheduler's thread is held, and jobs submitted meanwhile wait together."""
    gate = threading.Event()
    blocker = Job(generation("blocker", 1, trace, gate))
    scheduler.submit(blocker)
    time.sleep(0.2)
    return blocker, gate


def test_higher_priority_waiting_jobs_are_admitted_first_and_equals_in_order():
    scheduler = Scheduler(max_active=1, max_waiting=10)
    trace: list[str] = []
    try:
        blocker, gate = held_by_a_blocker(scheduler, trace)  # it holds the only slot
        jobs = {
            name: Job(generation(name, 2, trace), priority=priority)
            for name, priority in (("low1", 0), ("high", 5), ("low2", 0), ("mid", 1))
        }
        for job in jobs.values():
            scheduler.submit(job)
        gate.set()
        for job in [blocker, *jobs.values()]:
            finish(job)
    finally:
        scheduler.stop()
    order = [name for index, name in enumerate(trace) if name != "blocker" and trace.index(name) == index]
    assert order == ["high", "mid", "low1", "low2"]


def test_active_jobs_take_turns():
    scheduler = Scheduler(max_active=3, max_waiting=10)
    trace: list[str] = []
    gate = threading.Event()
    try:
        jobs = [Job(generation(name, 4, trace, gate if name == "a" else None)) for name in "abc"]
        for job in jobs:
            scheduler.submit(job)
        gate.set()
        for job in jobs:
            finish(job)
    finally:
        scheduler.stop()
    # After the first turn, no job takes two steps while another waits.
    steady = trace[3:9]
    assert all(steady[i] != steady[i + 1] for i in range(len(steady) - 1)), trace


def test_a_cancelled_job_is_dropped_and_closed():
    scheduler = Scheduler(max_active=1, max_waiting=10)
    closed = threading.Event()

    def endless() -> Iterator[dict]:
        try:
            while True:
                time.sleep(0.01)
                yield {"event": "text", "text": "x", "token_id": 1}
        finally:
            closed.set()

    try:
        job = Job(endless())
        scheduler.submit(job)
        job.output.get(timeout=5)
        job.cancelled.set()
        assert closed.wait(5)
        other = Job(generation("next", 1, []))
        scheduler.submit(other)
        assert finish(other)[-1]["event"] == "done"
        assert scheduler.stats.cancelled == 1
    finally:
        scheduler.stop()


def test_a_detached_run_waiting_on_the_network_holds_up_no_local_job():
    scheduler = Scheduler(max_active=1, max_waiting=10)
    gate = threading.Event()
    trace: list[str] = []
    try:
        routed = Job(Detached(generation("routed", 1, trace, gate)))
        scheduler.submit(routed)
        local = Job(generation("local", 3, trace))
        scheduler.submit(local)
        assert finish(local)[-1]["event"] == "done"  # while the routed run still waits
        assert "routed" not in trace
        gate.set()
        assert finish(routed)[-1]["event"] == "done"
    finally:
        scheduler.stop()
    assert scheduler.stats.active == 0


def test_a_run_has_ended_when_its_answer_is_heard():
    """What a run does as it ends (a pipeline session paying its stages) is done before its
    reader gets the final event, on the scheduler's thread and on a detached one alike;
    a run that fails while ending still gives its answer."""
    scheduler = Scheduler(max_active=2, max_waiting=10)

    def run(ended: list[str], fail: bool) -> Iterator[dict]:
        try:
            yield {"event": "text", "text": "a", "token_id": 1}
            yield {"event": "done", "finish_reason": "length"}
        finally:
            time.sleep(0.2)  # slower than the reader
            ended.append("paid")
            if fail:
                raise RuntimeError("the receipt could not be stored")

    try:
        for wrap in (lambda events: events, Detached):
            for fail in (False, True):
                ended: list[str] = []
                job = Job(wrap(run(ended, fail)))
                scheduler.submit(job)
                assert finish(job)[-1]["event"] == "done"
                assert ended == ["paid"], (wrap, fail)
    finally:
        scheduler.stop()


def prompted(
    name: str, chunks: int, steps: int, trace: list[str], priority: int = 0, chunk_seconds: float = 0.0
) -> Job:
    """A generation whose prompt goes in over `chunks` turns (progress events), then
    `steps` tokens."""

    def events() -> Iterator[dict]:
        for _ in range(chunks):
            time.sleep(chunk_seconds)
            trace.append(f"{name}:prompt")
            yield {"event": "progress", "prompt": True}
        for step in range(steps):
            trace.append(name)
            yield {"event": "text", "text": f"{name}{step}", "token_id": step}
        yield {"event": "done", "finish_reason": "length"}

    return Job(events(), priority=priority)


def beside_a_running_generation(scheduler: Scheduler, burst: list[Job], trace: list[str]) -> None:
    """Runs `burst` to the end, arriving together while a generation ("running" in
    `trace`) decodes; stops the scheduler."""
    gate = threading.Event()
    try:
        running = Job(generation("running", 40, trace, gate))
        scheduler.submit(running)
        for job in burst:
            scheduler.submit(job)
        time.sleep(0.2)  # all are active before the first step
        gate.set()
        for job in [running, *burst]:
            finish(job)
    finally:
        scheduler.stop()


def test_arriving_prompts_take_one_turn_between_two_tokens_of_a_running_generation():
    trace: list[str] = []
    burst = [prompted(f"p{i}", 2, 2, trace) for i in range(4)]
    beside_a_running_generation(Scheduler(max_active=8, max_waiting=10), burst, trace)
    first, last = trace.index("running"), max(i for i, name in enumerate(trace) if name.endswith(":prompt"))
    window = trace[first : last + 1]
    # Eight prompt turns (four prompts of two chunks), never two without a token between.
    assert sum(name.endswith(":prompt") for name in window) == 8
    for before, after in itertools.pairwise(window):
        assert not (before.endswith(":prompt") and after.endswith(":prompt")), trace
    # One prompt at a time, in arrival order: each is in before the next begins.
    prompts = [name.split(":")[0] for name in window if name.endswith(":prompt")]
    assert prompts == ["p0", "p0", "p1", "p1", "p2", "p2", "p3", "p3"]


def prompt_window(trace: list[str], running: str) -> list[list[str]]:
    """The prompt turns between each two tokens of `running` (and before its first)."""
    windows: list[list[str]] = [[]]
    for name in trace:
        if name == running:
            windows.append([])
        elif name.endswith(":prompt"):
            windows[-1].append(name.split(":")[0])
    return [window for window in windows if window]


def test_short_prompts_arriving_together_go_in_in_one_round():
    trace: list[str] = []
    burst = [prompted(f"p{i}", 1, 2, trace) for i in range(6)]
    for job in burst:
        job.prompt_left = 40  # six of 40 tokens: 240, within one chunk of 256
    beside_a_running_generation(Scheduler(max_active=8, max_waiting=10, prompt_budget=256), burst, trace)
    assert prompt_window(trace, "running") == [[f"p{i}" for i in range(6)]]


def test_a_round_takes_in_at_most_one_chunks_worth_of_prompt_tokens():
    """Prompts whose turns overflow what is left of the chunk wait for the next round;
    a smaller one that fits goes in beside the first admitted."""
    trace: list[str] = []
    sizes = {"big": 300, "mid": 200, "small": 40, "unknown": None}
    burst = [prompted(name, -(-(size or 256) // 256), 1, trace) for name, size in sizes.items()]
    for job, size in zip(burst, sizes.values(), strict=True):
        job.prompt_left = size
    beside_a_running_generation(Scheduler(max_active=8, max_waiting=10, prompt_budget=256), burst, trace)
    # big goes in as 256 + 44 tokens: mid (200) fits beside its last chunk, and then
    # small (40) no longer does; a job of unknown size counts as a whole chunk.
    assert prompt_window(trace, "running") == [["big"], ["big", "mid"], ["small"], ["unknown"]]


def test_queued_prompt_chunks_run_once_every_chosen_prompt_has_queued_its_own():
    """A backend that queues a chunk ("queued" progress) and runs it on its next turn
    gets that turn after the round's other prompts queued theirs: one call can run
    them all."""
    scheduler = Scheduler(max_active=8, max_waiting=10, prompt_budget=256)
    trace: list[str] = []

    def queuing(name: str) -> Job:
        def events() -> Iterator[dict]:
            trace.append(f"{name}:queue")
            yield {"event": "progress", "prompt": True, "queued": True}
            trace.append(f"{name}:run")
            yield {"event": "text", "text": name, "token_id": 1}
            yield {"event": "done", "finish_reason": "length"}

        return Job(events(), prompt_left=30)

    try:
        blocker, gate = held_by_a_blocker(scheduler, trace)
        jobs = [queuing(name) for name in "abc"]
        for job in jobs:
            scheduler.submit(job)
        gate.set()
        for job in [blocker, *jobs]:
            assert finish(job)[-1]["event"] == "done"
    finally:
        scheduler.stop()
    assert [name for name in trace if ":" in name] == [
        "a:queue",
        "b:queue",
        "c:queue",
        "a:run",
        "b:run",
        "c:run",
    ]


def test_prompts_go_in_in_admission_order_which_is_by_priority():
    scheduler = Scheduler(max_active=8, max_waiting=10)
    trace: list[str] = []
    try:
        blocker, gate = held_by_a_blocker(scheduler, trace)
        jobs = [
            prompted(name, 1, 1, trace, priority) for name, priority in (("low", 0), ("high", 5), ("mid", 1))
        ]
        for job in jobs:
            scheduler.submit(job)
        gate.set()
        for job in [blocker, *jobs]:
            finish(job)
    finally:
        scheduler.stop()
    prompts = [name.split(":")[0] for name in trace if name.endswith(":prompt")]
    assert prompts == ["high", "mid", "low"]


def test_a_cancelled_job_waiting_for_its_prompt_turn_is_dropped_at_once():
    scheduler = Scheduler(max_active=8, max_waiting=10)
    trace: list[str] = []
    try:
        long = prompted("long", 100, 1, trace, chunk_seconds=0.02)
        waiting = prompted("waiting", 1, 1, trace)
        scheduler.submit(long)
        scheduler.submit(waiting)
        waiting.cancelled.set()
        deadline = time.monotonic() + 1.0  # the long prompt takes two seconds
        while scheduler.stats.cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.stats.cancelled == 1
        assert "long" not in trace  # still in its prompt
        assert finish(long)[-1]["event"] == "done"
    finally:
        scheduler.stop()
    assert "waiting:prompt" not in trace


def test_a_generation_decoding_without_text_holds_no_prompt_turn():
    """A forced tool call decodes tokens that show nothing yet (plain progress events):
    past its prompt, it takes a decode turn each round and lets arriving prompts in."""
    scheduler = Scheduler(max_active=8, max_waiting=10)
    trace: list[str] = []
    gate = threading.Event()

    def tool_call() -> Iterator[dict]:
        gate.wait(10)
        trace.append("tool:prompt")
        yield {"event": "progress", "prompt": True}
        for _ in range(20):
            trace.append("tool")
            yield {"event": "progress"}
        yield {"event": "done", "finish_reason": "tool_calls"}

    try:
        tool = Job(tool_call())
        scheduler.submit(tool)
        arriving = prompted("arriving", 1, 1, trace)
        scheduler.submit(arriving)
        time.sleep(0.2)
        gate.set()
        for job in (tool, arriving):
            finish(job)
    finally:
        scheduler.stop()
    assert trace.index("arriving:prompt") < trace.index("tool") + 3, trace


def test_a_prompt_awaiting_peers_holds_no_prompt_turn_and_does_not_spin():
    """While a job's prefix blocks are awaited from peers (waiting progress events, no
    device work), other prompts go in; alone, its polls are paced, not a busy loop."""
    scheduler = Scheduler(max_active=8, max_waiting=10)
    trace: list[str] = []
    answered = threading.Event()
    polls = 0

    def fetching() -> Iterator[dict]:
        nonlocal polls
        while not answered.is_set():
            polls += 1
            yield {"event": "progress", "prompt": True, "waiting": True}
        trace.append("fetching:prompt")
        yield {"event": "progress", "prompt": True}
        trace.append("fetching")
        yield {"event": "text", "text": "x", "token_id": 1}
        yield {"event": "done", "finish_reason": "length"}

    try:
        fetcher = Job(fetching())
        scheduler.submit(fetcher)
        time.sleep(0.3)
        assert polls < 600  # about one a millisecond at most
        arriving = prompted("arriving", 2, 1, trace)
        scheduler.submit(arriving)
        assert finish(arriving)[-1]["event"] == "done"  # while the fetch is still out
        answered.set()
        assert finish(fetcher)[-1]["event"] == "done"
    finally:
        scheduler.stop()
    assert trace.index("arriving") < trace.index("fetching:prompt")


def test_a_request_cancelled_while_waiting_frees_its_place_in_the_queue():
    scheduler = Scheduler(max_active=1, max_waiting=1)
    trace: list[str] = []
    try:
        _, gate = held_by_a_blocker(scheduler, trace)  # it holds the only slot
        gone = Job(generation("gone", 1, trace))
        scheduler.submit(gone)
        gone.cancelled.set()  # its reader hung up while it waited
        later = Job(generation("later", 1, trace))
        scheduler.submit(later)  # no OverflowError: the queue's place is free again
        gate.set()
        assert finish(later)[-1]["event"] == "done"
    finally:
        scheduler.stop()
    assert "gone" not in trace and scheduler.stats.cancelled == 1


def test_an_admitted_prompt_is_not_starved_by_later_higher_priority_ones():
    scheduler = Scheduler(max_active=8, max_waiting=10)
    trace: list[str] = []
    try:
        low = prompted("low", 10, 1, trace, priority=-30, chunk_seconds=0.02)
        scheduler.submit(low)
        time.sleep(0.05)  # admitted, its prompt under way
        highs = [prompted(f"high{i}", 3, 1, trace, priority=5, chunk_seconds=0.01) for i in range(3)]
        for job in highs:
            scheduler.submit(job)
        for job in [low, *highs]:
            finish(job)
    finally:
        scheduler.stop()
    prompts = [name.split(":")[0] for name in trace if name.endswith(":prompt")]
    assert prompts[:10] == ["low"] * 10, prompts


def test_a_prompt_cancelled_during_a_round_s_decode_turns_is_closed_once():
    """A reader hanging up while the round's decode steps run: the prompt it waited for
    never runs, is closed once and counted once."""
    scheduler = Scheduler(max_active=8, max_waiting=10, prompt_budget=256)
    trace: list[str] = []
    closed: list[str] = []
    submitted = threading.Event()
    holder: dict[str, Job] = {}

    class Prompt:
        """A prompt's events whose closing is counted (an unstarted generator's is not)."""

        def __init__(self) -> None:
            self.events = iter(
                [{"event": "progress", "prompt": True}, {"event": "done", "finish_reason": "length"}]
            )

        def __iter__(self) -> Prompt:
            return self

        def __next__(self) -> dict:
            trace.append("late:prompt")
            return next(self.events)

        def close(self) -> None:
            closed.append("late")

    def running() -> Iterator[dict]:
        for step in range(400):
            if submitted.is_set() and scheduler.stats.active == 2:  # admitted this round
                holder["late"].cancelled.set()  # during the round's decode turns
            yield {"event": "text", "text": "r", "token_id": step}
            time.sleep(0.001)
        yield {"event": "done", "finish_reason": "length"}

    try:
        first = Job(running())
        scheduler.submit(first)
        time.sleep(0.05)
        late = holder["late"] = Job(Prompt(), prompt_left=10)
        submitted.set()
        scheduler.submit(late)
        deadline = time.monotonic() + 5
        while not closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert finish(first)[-1]["event"] == "done"
    finally:
        scheduler.stop()
    assert closed == ["late"] and "late:prompt" not in trace
    assert scheduler.stats.cancelled == 1


def test_a_prompt_length_that_is_not_a_count_of_tokens_is_taken_as_unknown():
    """A start event's prompt_tokens (a peer's, for delegated work) sizes the job's turns
    only when it is a whole number of tokens."""
    for bad in ("12", True, -5, 3.5, None):
        assert Job(iter(()), prompt_left=bad).prompt_left is None
    assert Job(iter(()), prompt_left=0).prompt_left == 0
    assert Job(iter(()), prompt_left=40).prompt_left == 40
