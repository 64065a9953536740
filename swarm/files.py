"""Atomic file writes: a file is replaced only by a complete, synced successor.

Owns `atomic_writer` and `atomic_write_text`, used for caches, manifests, config and
state files. Imports only the standard library, so the DHT process and the control plane
can write files without pulling in numpy or jax.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A binary file written beside `path` and renamed onto it only once complete and synced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically: temp file in the same dir, fsync, rename."""
    with atomic_writer(path) as handle:
        handle.write(text.encode("utf-8"))
