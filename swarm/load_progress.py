"""How far a node is in loading its model, as a percentage the dashboard can show.

Loading runs in phases: `model` (finding, downloading or assembling the GGUF), `weights`
(reading the layers' tensors: bytes done of bytes to read), `compile` (compiling the
common shapes for this machine, with no count of its own) and `peers` (a node holding
part of a model measures itself and joins the swarm before it serves). Each phase's
share of the bar is its share of the time the last load of the same model took here
(`<data dir>/run/load-times.json`), or a default split the first time; inside a phase the
bar follows its count where it has one, and otherwise the time it took last time (never
past 95 % of the phase until it ends). Imports nothing heavy.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from swarm.files import atomic_write_text

PHASES = ("model", "weights", "compile", "peers")
# Seconds each phase is expected to take before this machine has timed one load.
DEFAULT_SECONDS = {"model": 1.0, "weights": 4.0, "compile": 15.0, "peers": 2.0}
HISTORY_FILE = "load-times.json"
UNTIMED_CAP = 0.95  # a phase with no count of its own shows at most this much of itself


class LoadProgress:
    """The progress of one load of `model_id` (see the module docstring). Thread-safe:
    the loading thread reports, any other reads `snapshot()`."""

    def __init__(self, model_id: str, run_dir: Path | None, phases: tuple[str, ...] = PHASES) -> None:
        self.model_id = model_id
        self.path = run_dir / HISTORY_FILE if run_dir is not None else None
        self.phases = phases
        self.expected = {**DEFAULT_SECONDS, **self._history().get(model_id, {})}
        self.began = time.monotonic()
        self.took: dict[str, float] = {}
        self._lock = threading.Lock()
        self._phase = phases[0]
        self._phase_began = self.began
        self._done = 0
        self._total: int | None = None
        self._unit = ""
        self._finished = False

    def _history(self) -> dict[str, dict[str, float]]:
        if self.path is None:
            return {}
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(raw, dict):
            return {}
        return {
            str(model): {
                phase: float(seconds)
                for phase, seconds in times.items()
                if phase in PHASES and isinstance(seconds, int | float) and 0 <= seconds < 86_400
            }
            for model, times in raw.items()
            if isinstance(times, dict)
        }

    def phase(self, name: str, total: int | None = None, unit: str = "") -> None:
        """Starts phase `name` (ending the one before). A phase with a `unit` is counted
        (`advance`; `total` may come later); one without follows the time."""
        if name not in self.phases:
            raise ValueError(f"unknown load phase {name!r}")
        now = time.monotonic()
        with self._lock:
            self.took[self._phase] = self.took.get(self._phase, 0.0) + now - self._phase_began
            self._phase, self._phase_began = name, now
            self._done, self._total, self._unit = 0, total, unit

    def advance(self, done: int, total: int | None = None) -> None:
        """`done` of the current phase's count (and its total, when it was not known at its start)."""
        with self._lock:
            self._done = done
            if total is not None:
                self._total = total

    def finish(self) -> None:
        """The load is over: records how long each phase took, for the next load's bar."""
        with self._lock:
            self.took[self._phase] = self.took.get(self._phase, 0.0) + time.monotonic() - self._phase_began
            self._finished = True
            took = dict(self.took)
        if self.path is None:
            return
        history = self._history()
        history[self.model_id] = {phase: round(took.get(phase, 0.0), 3) for phase in self.phases}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(history, indent=1, sort_keys=True) + "\n")
        except OSError:
            pass  # the next load's bar is only less accurate

    def snapshot(self) -> dict[str, Any]:
        """{phase, percent (0-100), done, total, unit, elapsed_s}: what the dashboard shows."""
        now = time.monotonic()
        with self._lock:
            phase, done, total, unit = self._phase, self._done, self._total, self._unit
            in_phase = now - self._phase_began
            finished = self._finished
        weights = [max(self.expected.get(name, 0.0), 0.05) for name in self.phases]
        shares = [weight / sum(weights) for weight in weights]
        index = self.phases.index(phase)
        if unit:  # a counted phase: nothing of it is done until its count says so
            fraction = min(done / total, 1.0) if total else 0.0
        else:
            fraction = min(in_phase / max(self.expected.get(phase, 1.0), 1e-3), UNTIMED_CAP)
        percent = 100.0 * (sum(shares[:index]) + shares[index] * fraction)
        if finished:  # whatever phases this load had no need of (a whole-model node joins peers later)
            percent = 100.0
        return {
            "phase": phase,
            "percent": round(min(percent, 100.0), 1),
            "done": done,
            "total": total,
            "unit": unit,
            "elapsed_s": round(now - self.began, 1),
        }
