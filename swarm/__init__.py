"""swarm: peer-to-peer LLM inference over GGUF models.

This package root stays import-light: it must not import jax, numpy or any heavy
module, so that the control plane and the DHT process can import the vocabulary
modules beneath it without pulling the engine in.
"""

__version__ = "0.1.0"
