"""swarm's control plane: the HTTP APIs (OpenAI, Anthropic, MCP, admin, metrics).

A Flask app under gunicorn with gevent workers. It never imports jax and reaches
the node only through `control.node_client`.
"""
