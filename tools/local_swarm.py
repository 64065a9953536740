"""Start N full swarm nodes on loopback and print one JSON line per node; Ctrl-C stops them.

    .venv/bin/python tools/local_swarm.py --nodes 3 --model smollm2-135m [--split auto|0-10,10-20,20-30]

Each line: {"name", "api", "api_key", "layers", "dht", "data_dir", "pids"}. See swarm/local_swarm.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swarm.local_swarm import main

if __name__ == "__main__":
    sys.exit(main())
