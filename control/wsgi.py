"""The gunicorn entry point: `gunicorn -c control/gunicorn_conf.py control.wsgi:app`.

Patches the standard library for gevent before anything else is imported (as CTFd's
wsgi.py does), so sockets opened later, the node client's included, yield to other
greenlets instead of blocking the worker. Then reads the config once, from the data
dir and the `SWARM_*` environment the supervisor passes down, and builds the app.
Must not import jax.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402

from control.app import create_app  # noqa: E402
from control.middleware import configure_logging  # noqa: E402
from swarm.config import load_config  # noqa: E402
from swarm.paths import data_dir as resolve_data_dir  # noqa: E402
from swarm.supervisor import active_overrides  # noqa: E402

data_dir = resolve_data_dir(os.environ)
supervised = bool(os.environ.get("SWARM_INTERNAL_SUPERVISOR_PID"))
# Under a supervisor, the model it serves now (switched since gunicorn started, maybe).
config = load_config(data_dir, os.environ, active_overrides(data_dir) if supervised else {})
configure_logging(config.logging.level)
app = create_app(config, data_dir)
# Set by the supervisor: who to SIGHUP when /api/admin/config/reload asks for a reload.
app.config["SUPERVISOR_PID"] = os.environ.get("SWARM_INTERNAL_SUPERVISOR_PID", "")
