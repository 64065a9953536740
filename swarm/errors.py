"""Error types users see.

Every failure a user can cause (a bad file, an unknown model, a prompt too long)
raises a `SwarmError` subclass whose message is one line naming the problem; the
CLI prints it without a traceback. Imports nothing heavy.
"""


class SwarmError(Exception):
    """Base class for errors reported to users as one line."""


class ModelFileError(SwarmError):
    """A model file is missing, truncated, not GGUF, or internally inconsistent."""


class UnsupportedModelError(SwarmError):
    """The GGUF is valid but describes an architecture or type swarm cannot run."""


class UnknownModelError(SwarmError):
    """A model name that is neither a path nor a registered model."""


class ContextOverflowError(SwarmError):
    """A prompt (plus requested tokens) does not fit the context window."""


class InvalidRequestError(SwarmError):
    """Bad sampling parameters or request fields."""


class UnavailableError(SwarmError):
    """What the request needs cannot be reached now (a peer, the model loading); try again."""
