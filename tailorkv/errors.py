"""Typed errors shared by every layer. The CLI turns them into one line and exit code 2; the API into 4xx."""


class TailorKVError(Exception):
    """Base class: a problem the user can fix (bad model path, bad request, bad config)."""


class ModelLoadError(TailorKVError):
    """The model could not be found or is not of a supported kind."""


class ConfigError(TailorKVError):
    """An engine option is invalid; raised at engine start, before any request runs."""


class InvalidRequestError(TailorKVError):
    """A request is malformed: empty prompt, bad sampling parameters, too long for the context."""


class CapacityError(TailorKVError):
    """The request can never fit in the KV memory of this engine (a client error: HTTP 400)."""


class QueueFullError(CapacityError):
    """The waiting queue is full; the same request may succeed later (HTTP 503)."""
