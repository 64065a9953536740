"""Where swarm keeps its files: the data dir.

`$SWARM_NODE_DATA_DIR`, else `$XDG_DATA_HOME/swarm`, else `~/.local/share/swarm`;
a `--data-dir` flag overrides all. Entry points call `data_dir()` once with their
environment and pass the result down; nothing deeper reads the environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def data_dir(environ: Mapping[str, str], override: str | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    if environ.get("SWARM_NODE_DATA_DIR"):
        return Path(environ["SWARM_NODE_DATA_DIR"]).expanduser()
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "swarm"
