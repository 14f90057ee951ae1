"""
The GrowthHub client: the project's only way to talk to the GrowthHub (HighLevel / LeadConnector) API.

It owns the HTTP contract: bearer auth (Private Integration Token, access token or OAuth with
refresh-token rotation), the ``Version`` header, rate limiting, tenacity retries, error
classification and concurrent, identity-serialised upserts (the window in :mod:`.batch`). What
several workers of one location must agree on (limiter, token state) comes from a
:class:`Coordination`. It knows nothing of warehouses or of Airflow: the hook builds it from a
connection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from growthhub_provider.client.batch import (
    BatchRow,
    BatchStats,
    IdentityWindow,
    OutcomeStatus,
    UpsertOutcome,
    by_cause,
)
from growthhub_provider.client.coordination import LocalCoordination, TokenState, renewal_time
from growthhub_provider.client.errors import (
    GrowthHubAuthError,
    GrowthHubBadResponse,
    GrowthHubConfigError,
    GrowthHubDailyQuotaSpent,
    GrowthHubError,
    GrowthHubNotFound,
    GrowthHubRejected,
    GrowthHubTransientError,
    GrowthHubTransportError,
)
from growthhub_provider.client.responses import (
    UpsertResult,
    api_messages,
    body_kind,
    contact_in,
    identity_keys,
    json_object,
    raise_for_status,
    short,
    upsert_result,
)
from growthhub_provider.client.settings import RetryTally
from growthhub_provider.client.transport import Transport
from growthhub_provider.masking import mask_pii

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    import tenacity

    from growthhub_provider.client.coordination import Coordination, RateLimiter, TokenStore
    from growthhub_provider.client.settings import ClientConfig
    from growthhub_provider.client.transport import Answer

USER_AGENT = "growthhub-provider"
UPSERT_ENDPOINT = "/contacts/upsert"
OAUTH_ENDPOINT = "/oauth/token"
_CONNECTION_TEST_CONTACT = "growthhub-connection-test"


class _DailyQuotaReached(Exception):
    """The known daily quota fell to the caller's reserve: the row is not sent."""


class GrowthHubClient:
    """
    Upsert contacts into GrowthHub, fast and within the API's limits.

    Bad answers, and what they become (``upsert_contacts`` outcome in brackets):

    - 429, 5xx, whatever the body (JSON, a proxy's HTML page, empty, huge), timeouts, dropped
      connections: :class:`GrowthHubTransientError` etc., retried (``failed`` once retries run out).
    - 2xx whose body is empty, not JSON (e.g. a 200 ``text/html`` page), JSON but not an object,
      without a string ``contact.id``, undecodable (``Content-Encoding``) or over
      ``MAX_RESPONSE_BYTES``: :class:`GrowthHubBadResponse`, not retried (``failed``): the
      write may or may not have happened; the caller defers the row and a later idempotent upsert
      settles it. Never ``rejected``: nothing says the payload is wrong.
    - 400/422 with a non-JSON body: :class:`GrowthHubRejected` (``rejected``) with the reason and
      the start of the body as its message; 401/403 with any body: :class:`GrowthHubAuthError`.
    - An unusable 200 from ``/oauth/token``: :class:`GrowthHubAuthError` (the task fails once
      instead of every row spending a refresh); its message never quotes that body.
    - The coordination state unreachable: ``CoordinationError`` out of the batch; nothing is sent
      without the shared limiter.

    Messages quote at most ``MAX_MESSAGE_CHARS`` characters of a body and ``MAX_MESSAGES`` API
    messages, with the client's secrets and bearer tokens redacted, and emails/phones masked in
    logs and exception text (unless ``log_pii``).

    :param config: where and how to connect.
    :param coordination: the location's shared state (default: local to this host, tokens in
        ``~/.growthhub-tokens.json``).
    :param logger: where the client logs (default: this module's logger).
    :param on_secret: called with every secret the client learns (new access and refresh tokens),
        so a host such as Airflow can mask them in its logs.
    """

    def __init__(
        self,
        config: ClientConfig,
        *,
        coordination: Coordination | None = None,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
        on_secret: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.coordination = coordination or LocalCoordination(
            config.base_url, config.location_id, Path.home() / ".growthhub-tokens.json"
        )
        self.log = logger or logging.getLogger(__name__)
        self._on_secret = on_secret
        self._secrets: set[str] = set()
        for secret in config.secrets:
            self._learn_secret(secret)
        self.last_batch_stats: BatchStats | None = None
        self.transport = Transport(timeout=config.timeout, verify=config.verify, proxies=config.proxies)
        self._headers = {
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Version": config.api_version,
        }
        self._limiter: RateLimiter | None = None
        self._token_store: TokenStore | None = None
        self._refresh_lock = threading.Lock()
        self._access_token: str | None = config.token
        self._access_expires_at: float | None = None
        self._stored_token_checked = False
        self._auth_failure: str | None = None
        self._throttled = 0
        self._throttled_lock = threading.Lock()

    # -- set-up -----------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.config.base_url

    @property
    def location_id(self) -> str | None:
        return self.config.location_id

    @property
    def limiter(self) -> RateLimiter:
        """The location's limiter, shared as the coordination says."""
        if self._limiter is None:
            self._limiter = self.coordination.limiter(self.config.limits)
        return self._limiter

    @property
    def daily_remaining(self) -> int | None:
        """Daily quota left: the server's last figure less what went out since (at first: the limit)."""
        return self.limiter.daily_remaining

    def url(self, endpoint: str) -> str:
        return f"{self.config.base_url.rstrip('/')}/{endpoint.lstrip('/')}"

    # -- secrets and messages ---------------------------------------------------------------------

    def _learn_secret(self, secret: str) -> None:
        self._secrets.add(secret)
        if self._on_secret is not None:
            self._on_secret(secret)

    def _scrub(self, text: str) -> str:
        """``text`` without any secret this client knows (bodies may echo what they were sent)."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def _log_text(self, text: str) -> str:
        return text if self.config.log_pii else mask_pii(text)

    # -- auth -------------------------------------------------------------------------------------

    @property
    def token_store(self) -> TokenStore:
        if self.config.oauth is None:
            raise GrowthHubConfigError(f"{self.config.name!r} has no OAuth client: no token store")
        if self._token_store is None:
            self._token_store = self.coordination.token_store(self.config.name)
        return self._token_store

    def _adopt(self, state: TokenState) -> None:
        if state.access_token:  # another worker's token is as secret here as where it was issued
            self._learn_secret(state.access_token)
        self._access_token = state.access_token
        self._access_expires_at = state.expires_at

    @staticmethod
    def _usable(state: TokenState | None, stale: str | None) -> bool:
        """A stored access token newer than ``stale`` and still valid: another worker refreshed."""
        return (
            state is not None
            and state.access_token is not None
            and state.access_token != stale
            and (state.expires_at is None or state.expires_at > time.time())
        )

    def _ensure_access_token(self) -> None:
        if self.config.oauth and not self._stored_token_checked:
            self._adopt_stored_token()
        token = self._access_token
        expired = self._access_expires_at is not None and time.time() >= self._access_expires_at
        if self.config.oauth and (token is None or expired):
            self._refresh_access_token(stale=token)
        elif not self.config.oauth and token is None:
            raise GrowthHubAuthError(f"{self.config.name!r} has neither a token nor an OAuth client")

    def _adopt_stored_token(self) -> None:
        """Start from the access token another worker or task stored: newer than the connection's."""
        oauth = self.config.oauth
        assert oauth is not None
        with self._refresh_lock:
            if not self._stored_token_checked:
                state = self.token_store.load(oauth.refresh_token)
                if self._usable(state, None):
                    self._adopt(state)  # type: ignore[arg-type]
                self._stored_token_checked = True

    def _refresh_access_token(self, stale: str | None) -> None:
        """
        Get an access token newer than ``stale``: another worker's if it refreshed, else our own.

        Exactly one worker spends the refresh token, under the token store's lock; the others wait
        for that lock and then read the new token instead of spending the old one again.
        """
        oauth = self.config.oauth
        assert oauth is not None
        with self._refresh_lock:
            if self._auth_failure:
                raise GrowthHubAuthError(self._auth_failure)
            if self._access_token != stale:
                return
            store = self.token_store
            state = store.load(oauth.refresh_token)
            if self._usable(state, stale):
                self._adopt(state)  # type: ignore[arg-type]
                return
            with store.refresh_lock():
                state = store.load(oauth.refresh_token)
                if self._usable(state, stale):
                    self._adopt(state)  # type: ignore[arg-type]
                    return
                spent = state.refresh_token if state else oauth.refresh_token
                new_state = self._spend_refresh_token(spent)
                store.save(oauth.refresh_token, new_state)
            self._adopt(new_state)
            self.log.info("Refreshed the OAuth access token of %s", self.config.name)

    def _spend_refresh_token(self, refresh_token: str) -> TokenState:
        """``POST /oauth/token``: trade ``refresh_token`` for a new pair (GrowthHub spends the old one)."""
        oauth = self.config.oauth
        assert oauth is not None
        form = {
            "grant_type": "refresh_token",
            "client_id": oauth.client_id,
            "client_secret": oauth.client_secret,
            "refresh_token": refresh_token,
            "user_type": oauth.user_type,
        }
        response = self._post_form(OAUTH_ENDPOINT, form, bearer=False)
        problem = response.problem
        if response.status_code == 429 or response.status_code >= 500:
            # The token was not spent: the row's retry will try the refresh again.
            raise GrowthHubTransientError(response.status_code, "OAuth refresh failed")
        if response.status_code != 200:
            self._auth_failure = self._scrub(
                f"OAuth refresh for {self.config.name!r} failed: {response.status_code} "
                f"{'; '.join(api_messages(response))}"
            )
            raise GrowthHubAuthError(self._auth_failure)
        body = self._oauth_body(response, problem)
        self._learn_secret(body["access_token"])
        new_refresh_token = body.get("refresh_token") or refresh_token
        self._learn_secret(new_refresh_token)
        return TokenState(
            refresh_token=new_refresh_token,
            access_token=body["access_token"],
            expires_at=renewal_time(body.get("expires_in")),
        )

    def _oauth_body(self, response: Answer, problem: str | None) -> dict[str, Any]:
        """
        The token pair of a 200 refresh answer; an unusable one fails the task (auth error).

        The server may have spent the refresh token, and every row would try again: so fail once,
        clearly. The message never quotes this body: it would hold the new tokens.
        """
        try:
            if problem:
                raise GrowthHubBadResponse(response.status_code, problem)
            body = json_object(response)
        except GrowthHubBadResponse:
            detail = problem or f"not a JSON object ({body_kind(response)})"
        else:
            token = body.get("access_token")
            if isinstance(token, str) and token:
                return body
            detail = f"no access_token in the JSON ({body_kind(response)})"
        self._auth_failure = (
            f"OAuth refresh for {self.config.name!r} answered {response.status_code} with an "
            f"unusable body: {detail}. The refresh token may be spent: if the next try says "
            "invalid_grant, re-authorise the connection"
        )
        raise GrowthHubAuthError(self._auth_failure)

    # -- one request ------------------------------------------------------------------------------

    def _send(
        self, method: str, endpoint: str, body: dict[str, Any] | None, daily_reserve: int | None
    ) -> Answer:
        limiter = self.limiter
        if not limiter.acquire(daily_reserve):
            raise _DailyQuotaReached
        try:
            # After the wait for a slot, not before it: the wait can outlast a short-lived token,
            # and a request sent with an expired one wastes its slot on a 401.
            self._ensure_access_token()
            headers = {**self._headers, "Authorization": f"Bearer {self._access_token or ''}"}
            payload = None if body is None else json.dumps(body, allow_nan=False).encode()
            response = self.transport.request(method, self.url(endpoint), headers, payload)
        except BaseException:
            limiter.release()
            raise
        throttled = response.status_code == 429
        if throttled:
            with self._throttled_lock:
                self._throttled += 1
        limiter.release(response.headers, throttled=throttled)
        if response.problem and response.status_code < 400:
            raise GrowthHubBadResponse(response.status_code, response.problem)
        return response

    def _post_form(self, endpoint: str, form: dict[str, str], *, bearer: bool) -> Answer:
        """
        POST a form (the OAuth endpoints), outside the limiter: token traffic is not the
        location's contacts traffic. ``bearer`` sends the current access token.
        """
        headers = {**self._headers, "Content-Type": "application/x-www-form-urlencoded"}
        if bearer:
            headers["Authorization"] = f"Bearer {self._access_token or ''}"
        return self.transport.request("POST", self.url(endpoint), headers, urlencode(form).encode())

    def _call(
        self, method: str, endpoint: str, body: dict[str, Any] | None = None, daily_reserve: int | None = None
    ) -> Answer:
        """
        Send one request; on a 401 with OAuth, get a newer token once and send again.

        The first auth failure is remembered, so the other worker threads fail at once instead
        of each spending a request (and a refresh) to learn the same thing.
        """
        if self._auth_failure:
            raise GrowthHubAuthError(self._auth_failure)
        try:
            response = self._send(method, endpoint, body, daily_reserve)
            if response.status_code == 401 and self.config.oauth:
                used = response.request_headers.get("Authorization", "").removeprefix("Bearer ")
                self._refresh_access_token(stale=used)
                if self._auth_failure:
                    raise GrowthHubAuthError(self._auth_failure)
                response = self._send(method, endpoint, body, None)
            raise_for_status(response, self._scrub)
        except GrowthHubAuthError as e:
            self._auth_failure = str(e)
            raise
        return response

    def _with_location(self, payload: dict[str, Any]) -> dict[str, Any]:
        if payload.get("locationId") or not self.config.location_id:
            return payload
        return {**payload, "locationId": self.config.location_id}

    # -- public API -------------------------------------------------------------------------------

    def upsert_contact(self, payload: dict[str, Any]) -> UpsertResult:
        """
        Create or update one contact, retrying transient errors.

        :raises GrowthHubRejected: 400/422, with the API's messages.
        :raises GrowthHubAuthError: 401 after one refresh attempt, or 403.
        :raises GrowthHubTransientError: 429/5xx still failing after the retries.
        :raises GrowthHubBadResponse: a 2xx whose body is unusable (see the class docstring).
        """
        body = self._with_location(payload)
        response = self.config.retry.retrying()(self._call, "POST", UPSERT_ENDPOINT, body)
        return upsert_result(response)

    def get_contact(self, contact_id: str) -> dict[str, Any]:
        """
        Fetch one contact.

        :raises GrowthHubNotFound: unknown id, or a contact of another location.
        """
        response = self.config.retry.retrying()(self._call, "GET", f"/contacts/{quote(contact_id, safe='')}")
        return contact_in(json_object(response), response.status_code)

    def delete_contact(self, contact_id: str) -> bool:
        """Delete one contact (an erasure): ``True`` if deleted, ``False`` if it was already gone (404)."""
        with contextlib.suppress(GrowthHubNotFound):
            self.config.retry.retrying()(self._call, "DELETE", f"/contacts/{quote(contact_id, safe='')}")
            return True
        return False

    def check(self) -> tuple[bool, str]:
        """Check base URL, token and Version by fetching a contact that does not exist (404 = fine)."""
        try:
            self._call("GET", f"/contacts/{_CONNECTION_TEST_CONTACT}")
        except GrowthHubNotFound:
            pass
        except GrowthHubError as e:
            return False, self._scrub(str(e))
        return True, f"Connected to {self.base_url} (API version {self.config.api_version})"

    def verify_access(self) -> None:
        """
        :meth:`check`, but raising: the auth and config errors that fail a run, transient ones
        only once the retries are spent (a run is not failed by one blip). A spent daily quota
        passes: GrowthHub checked the token before counting the request, and the rows wait.
        """
        with contextlib.suppress(GrowthHubNotFound, GrowthHubDailyQuotaSpent):
            self.config.retry.retrying()(self._call, "GET", f"/contacts/{_CONNECTION_TEST_CONTACT}")

    def _upsert_row(self, row: BatchRow, daily_reserve: int, retrying: tenacity.Retrying) -> UpsertOutcome:
        attempts = 0

        def attempt() -> Answer:
            nonlocal attempts
            attempts += 1
            # The reserve only gates a row's first send; a retry finishes what was started.
            return self._call("POST", UPSERT_ENDPOINT, row.payload, daily_reserve if attempts == 1 else None)

        try:
            result = upsert_result(retrying(attempt))
        except (_DailyQuotaReached, GrowthHubDailyQuotaSpent):
            return UpsertOutcome(row.key, "skipped")
        except GrowthHubRejected as e:
            return UpsertOutcome(
                row.key, "rejected", http_status=e.status, messages=e.messages, attempts=attempts
            )
        except (GrowthHubTransientError, GrowthHubBadResponse) as e:
            what = "unusable response: " if isinstance(e, GrowthHubBadResponse) else ""
            return UpsertOutcome(
                row.key,
                "failed",
                http_status=e.status,
                messages=[f"{e.status}: {what}{e.message}"],
                attempts=attempts,
            )
        except (GrowthHubTransportError, GrowthHubNotFound) as e:
            return UpsertOutcome(
                row.key,
                "failed",
                messages=[short(self._scrub(f"{type(e).__name__}: {e}"))],
                attempts=attempts,
            )
        status: OutcomeStatus = "created" if result.new else "updated"
        return UpsertOutcome(row.key, status, result.contact_id, 200, [], result.trace_id, attempts)

    def upsert_contacts(
        self, rows: Iterable[tuple[str, dict[str, Any]]], *, daily_reserve: int = 0
    ) -> Iterator[UpsertOutcome]:
        """
        Upsert many contacts concurrently; yield one outcome per row as soon as it is known.

        Rows sharing an identity (normalised email or phone) go out one at a time in input order,
        so the CRM cannot race into duplicates. At most ``4 * max_workers`` rows are held in
        memory, whatever the size of ``rows``. Stats of the batch land in :attr:`last_batch_stats`.

        :param rows: ``(caller's row key, payload)`` pairs.
        :param daily_reserve: once the known daily quota is down to this, the remaining rows come
            back ``skipped`` without being sent, so a later run can resume.
        :raises GrowthHubAuthError: out of the iterator: the task must fail, not quarantine every row.
        :raises CoordinationError: out of the iterator: the shared limiter or token state is gone.
        """
        self._auth_failure = None
        started = time.monotonic()
        throttled_before = self._throttled
        counts: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        retries = RetryTally()
        abort = threading.Event()
        retrying = self.config.retry.retrying(abort, retries.add)  # per batch: tenacity 9 is thread-safe
        window = IdentityWindow(
            self.config.max_workers, lambda r: self._upsert_row(r, daily_reserve, retrying)
        )
        batch_rows = (
            BatchRow(key, self._with_location(payload), identity_keys(payload)) for key, payload in rows
        )
        try:
            for outcome in window.outcomes(batch_rows):
                self._count(counts, failed, outcome)
                yield outcome
        finally:
            abort.set()
            window.close()
            elapsed_s = time.monotonic() - started
            self._finish_batch(
                counts, failed, self._throttled - throttled_before, elapsed_s, retries.counts()
            )

    def _count(self, counts: Counter[str], failed: Counter[str], outcome: UpsertOutcome) -> None:
        """Count one outcome, failed ones by cause; each rejected or failed row is logged at debug."""
        counts[outcome.status] += 1
        counts["retried"] += max(outcome.attempts - 1, 0)
        if outcome.status in ("rejected", "failed"):
            if outcome.status == "failed":  # "503: ...", "ConnectTimeout: ...", "200: unusable response: ..."
                cause, _, rest = (outcome.messages or ["unknown"])[0].partition(":")
                failed[f"unusable {cause}" if rest.startswith(" unusable") else cause] += 1
            self.log.debug(
                "Row %s %s (HTTP %s): %s",
                outcome.key,
                outcome.status,
                outcome.http_status,
                self._log_text("; ".join(outcome.messages)),
            )

    def _finish_batch(
        self,
        counts: Counter[str],
        failed: Counter[str],
        throttled: int,
        elapsed_s: float,
        retried: dict[str, int],
    ) -> None:
        """One line of stats per batch, with retries by cause; one warning if rows failed."""
        daily_remaining = None
        with contextlib.suppress(GrowthHubError):  # an unreachable shared state is already raised
            daily_remaining = self.daily_remaining
        stats = BatchStats.from_counts(counts, throttled, elapsed_s, retried, daily_remaining)
        self.last_batch_stats = stats
        self.log.info("%s", stats.summary_line())
        if failed:
            self.log.warning(
                "GrowthHub batch: %s (deferred to the next run; each row at debug level)",
                by_cause(f"{stats.failed} rows failed after retries", failed),
            )
