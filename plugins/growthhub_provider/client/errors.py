"""The errors of the GrowthHub client, one class per way a request can end badly."""

from __future__ import annotations

from growthhub_provider.masking import mask_pii


class GrowthHubError(Exception):
    """Base of the errors the GrowthHub client raises."""


class GrowthHubAuthError(GrowthHubError):
    """401 after a refresh attempt, or 403: retrying cannot help, the task must fail."""


class GrowthHubConfigError(GrowthHubAuthError):
    """
    A setting every request depends on is wrong: the ``Version`` header (a 400 about the request
    rather than the payload), a TLS or coordination setting. Every row would fail.

    A subclass of :class:`GrowthHubAuthError` so callers treat it alike: fail the task, fix the
    connection, instead of quarantining a whole batch of good rows.
    """


class CoordinationError(GrowthHubError):
    """
    The shared state of a location (limiter, token state) cannot be read or written.

    Raised instead of sending: without the shared window a worker would send as if it were alone
    and every worker would burst together.
    """


class GrowthHubNotFound(GrowthHubError):
    """404: the contact does not exist (or belongs to another location)."""


class GrowthHubRejected(GrowthHubError):
    """
    400/422: the API refused this payload; sending it again would be refused again.

    :param status: HTTP status code.
    :param messages: the API's messages, one per failing field for 422.
    """

    def __init__(self, status: int, messages: list[str]) -> None:
        super().__init__(f"{status}: {mask_pii('; '.join(messages))}")
        self.status = status
        self.messages = messages


class GrowthHubTransientError(GrowthHubError):
    """429 or 5xx: worth retrying after a pause."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {mask_pii(message)}")
        self.status = status
        self.message = message
        self.throttled = status == 429


class GrowthHubDailyQuotaSpent(GrowthHubTransientError):
    """A 429 with ``X-RateLimit-Daily-Remaining: 0``: the location's daily quota is spent, so no
    retry helps before the next UTC day; rows wait for a later run (``skipped``), never fail."""


class GrowthHubBadResponse(GrowthHubError):
    """
    A 2xx answer whose body is unusable: not JSON, not an object, no ``contact.id``, empty or huge.

    Whether the write happened is unknown, so it is not retried within the batch: the row comes
    back ``failed`` and a later run's (idempotent) upsert settles it.

    :param status: HTTP status code.
    :param message: what was wrong, with at most ``MAX_MESSAGE_CHARS`` of the body.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: unusable response: {mask_pii(message)}")
        self.status = status
        self.message = message


class GrowthHubTransportError(GrowthHubError):
    """
    No usable answer came back: the request may or may not have reached the server.

    Retried as a transient failure (upserts are idempotent); the subclasses name the cause.
    """


class GrowthHubConnectionError(GrowthHubTransportError):
    """No connection (refused, reset, TLS failure, proxy refused), or a garbled answer."""


class GrowthHubTimeout(GrowthHubTransportError):
    """No connection, or no answer byte, within the timeout."""


class GrowthHubBrokenBody(GrowthHubTransportError):
    """The connection broke in the middle of the answer's body."""
