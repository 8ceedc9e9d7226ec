"""The failures a ranking request can end with, each answered with its own HTTP status."""

from __future__ import annotations


class RequestError(ValueError):
    """The request is well-formed JSON but does not fit the model (a string for a numeric feature,
    an unknown user group): 422."""


class NotReady(RuntimeError):
    """No model version serves the request's bucket: 503."""


class Overloaded(RuntimeError):
    """The request could not finish in time given the work queued ahead of it: 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed before its rows ran: 504."""


class TooManyCandidates(ValueError):
    """More candidates than ``MTRANK_MAX_CANDIDATES``: 413."""


class ListTooLong(TooManyCandidates):
    """A list feature longer than ``MTRANK_MAX_LIST_LEN``: 413."""


class BodyTooLarge(ValueError):
    """Request body over ``MTRANK_MAX_BODY_BYTES``: 413."""


class MalformedBody(ValueError):
    """Not JSON: 422."""


class ClientGone(Exception):
    """The client disconnected before its answer was ready: 499 in the metrics."""


class BodyTimeout(Exception):
    """The request body did not arrive within the request deadline: 408, connection closed."""
