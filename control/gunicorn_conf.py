"""gunicorn settings for the control plane; the supervisor passes this file with `-c`.

gevent workers: each request is a greenlet, so one worker holds many streams at once
(`worker_connections`). A gevent worker heartbeats from its own greenlet, so `timeout`
does not cut off long generations; it only catches a worker that stopped scheduling.
Bind address and worker count come from the supervisor's `SWARM_INTERNAL_*` variables.
The app writes its own access lines (with request ids), so gunicorn's are off.
Must not import jax.
"""

import os

bind = os.environ.get("SWARM_INTERNAL_BIND", "127.0.0.1:8800")
workers = int(os.environ.get("SWARM_INTERNAL_WORKERS", "1"))
worker_class = "gevent"
worker_connections = 1000
timeout = 120
graceful_timeout = 30
keepalive = 5
accesslog = None
forwarded_allow_ips = "127.0.0.1"
# gunicorn >= 25 opens a management socket at one fixed path under $HOME by default;
# two nodes (or test runs) on one machine would fight over it, and nothing here uses it.
control_socket_disable = True


def child_exit(server: object, worker: object) -> None:
    """Drop a dead worker's live gauges from the shared metrics (multiprocess mode)."""
    from control import metrics

    metrics.worker_exit(worker.pid)  # type: ignore[attr-defined]
