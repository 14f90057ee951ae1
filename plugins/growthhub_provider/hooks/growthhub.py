"""
GrowthHub hook: the Airflow face of :class:`~growthhub_provider.client.GrowthHubClient`.

It reads a ``growthhub`` connection through the http provider's and the Task SDK's public API,
registers its secrets with Airflow's masker, picks the coordination backend the connection names
and builds the client. Everything the API does lives in the client.
"""

from __future__ import annotations

import dataclasses
import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from airflow.providers.http.hooks.http import HttpHook
from airflow.sdk.log import mask_secret

from growthhub_provider.client import (
    AgencyClient,
    BatchStats,
    ClientConfig,
    GrowthHubClient,
    GrowthHubConfigError,
    InstalledLocation,
    LimitSettings,
    LocalCoordination,
    OAuthCredentials,
    RetryPolicy,
    UpsertOutcome,
    UpsertResult,
    tls_verify,
    to_bool,
)
from growthhub_provider.client.settings import DEFAULT_API_VERSION, DEFAULT_MAX_WORKERS

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from airflow.sdk import Connection

    from growthhub_provider.client import Coordination, RateLimiter

LOCAL_COORDINATION = "local"
# Seconds a Redis call may take before the coordination counts as unreachable.
REDIS_TIMEOUT_S = 5.0


class GrowthHubHook(HttpHook):
    """
    Upsert contacts into GrowthHub, fast and within the API's limits.

    Connection (``conn_type`` ``growthhub``): host is the base URL, password the Private
    Integration Token or access token; extras ``location_id`` (used when the hook is given none,
    must agree when it is), ``api_version``, ``client_id``,
    ``client_secret``, ``refresh_token`` (OAuth), ``coordination``, ``refresh_token_file``,
    ``rate_limit_burst``, ``rate_limit_interval_ms``, ``rate_limit_daily``, ``max_workers``,
    ``timeout``, ``verify``, ``trust_env``, ``log_pii``. ``verify`` is true unless the extra says
    false; a path keeps it on against that CA bundle (see :func:`tls_verify`).

    An *agency* connection has extras ``company_id`` and ``app_id`` (both or neither), and the
    agency (company) OAuth access token as password, refreshed with the OAuth extras. It lists the
    locations where the app is installed (:meth:`installed_locations`); given a ``location_id``,
    the hook works as a location connection whose token the agency mints (and every worker of the
    location shares until it expires).

    ``coordination`` says where the state every worker of the location must share lives:
    ``local`` (default; this process's limiter, tokens in the 0600 ``refresh_token_file``, for
    one host) or the id of a ``redis`` connection (limiter window, daily quota and OAuth tokens in
    Redis, for Celery workers on several hosts).

    :param growthhub_conn_id: the connection to use.
    :param location_id: the location this hook serves, from the sync config; the source of truth.
        It fills payloads without ``locationId`` and keys the limiter and the coordination state;
        a connection whose extra ``location_id`` names another location is refused
        (:class:`GrowthHubConfigError`), or it would throttle this location's traffic under the
        other's limits. Without it, the extra's location is used.
    :param max_workers: concurrent requests of :meth:`upsert_contacts` (default: connection extra,
        else ``DEFAULT_MAX_WORKERS``; for a location of an agency connection, what its rate limit
        can use: ``location_workers``).
    :param max_attempts: attempts per row for transient errors (429, 5xx, timeouts, dropped connections).
    :param max_retry_seconds: give up retrying a row after this long.
    :param backoff_initial_s: first backoff; doubles per attempt, plus jitter.
    :param backoff_max_s: longest single backoff.
    :param coordination: the shared state to use instead of the one the connection names (on an
        agency connection, the location's; the agency's token state stays the connection's).
    """

    conn_name_attr = "growthhub_conn_id"
    default_conn_name = "growthhub_default"
    conn_type = "growthhub"
    hook_name = "GrowthHub"

    def __init__(
        self,
        growthhub_conn_id: str = default_conn_name,
        *,
        location_id: str | None = None,
        max_workers: int | None = None,
        max_attempts: int = 6,
        max_retry_seconds: float = 120.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        coordination: Coordination | None = None,
    ) -> None:
        super().__init__(method="POST", http_conn_id=growthhub_conn_id)
        self.growthhub_conn_id = growthhub_conn_id
        self._location_id = location_id
        self._max_workers = max_workers
        self._retry = RetryPolicy(max_attempts, max_retry_seconds, backoff_initial_s, backoff_max_s)
        self._coordination = coordination

    # -- the connection ---------------------------------------------------------------------------

    @cached_property
    def connection(self) -> Connection:
        return self.get_connection(self.growthhub_conn_id)

    @cached_property
    def extras(self) -> dict[str, Any]:
        """Connection extras; form fields saved as ``extra__growthhub__<name>`` read as ``<name>``."""
        prefix = f"extra__{self.conn_type}__"
        return {k.removeprefix(prefix): v for k, v in self.connection.extra_dejson.items() if v != ""}

    def _int_extra(self, name: str, default: int | None) -> int | None:
        value = self.extras.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except (TypeError, ValueError):
            raise GrowthHubConfigError(
                f"Connection {self.growthhub_conn_id!r}: extra {name}={value!r} is not a whole number"
            ) from None

    def _resolve_location_id(self) -> str | None:
        """The sync config's location if the hook was given one, else the connection's extra."""
        extra = self.extras.get("location_id")
        if self._location_id is None:
            return extra
        if extra is not None and str(extra) != self._location_id:
            raise GrowthHubConfigError(
                f"Connection {self.growthhub_conn_id!r}: extra location_id={extra!r} differs from the "
                f"location {self._location_id!r} the sync config uses it for; remove the extra or make it "
                f"{self._location_id!r}"
            )
        return self._location_id

    @cached_property
    def config(self) -> ClientConfig:
        """
        The client's settings, read once from the connection (extras win over defaults).

        :raises GrowthHubConfigError: an extra is invalid, or names another location than the hook's.
        """
        location_id = self._resolve_location_id()
        conn = self.connection
        # url_from_endpoint is HttpHook's public way to the base URL (scheme, host and port).
        base_url = self.url_from_endpoint("").rstrip("/")
        extras = self.extras
        oauth = None
        if all(extras.get(k) for k in ("client_id", "client_secret", "refresh_token")):
            oauth = OAuthCredentials(
                str(extras["client_id"]), str(extras["client_secret"]), str(extras["refresh_token"])
            )
        burst_cap = self._int_extra("rate_limit_burst", None)
        verify = tls_verify(extras.get("verify"))
        if verify is False:
            self.log.warning("TLS certificate verification is off for %s (extra verify=false)", conn.conn_id)
        proxies: dict[str, str] = {}
        if to_bool(extras.get("trust_env"), default=True):
            proxies = requests.utils.get_environ_proxies(base_url)
            if verify is True:
                verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        return ClientConfig(
            base_url=base_url,
            name=self.growthhub_conn_id,
            token=conn.password or None,
            location_id=location_id,
            api_version=str(extras.get("api_version") or DEFAULT_API_VERSION),
            oauth=oauth,
            limits=LimitSettings(
                burst=burst_cap or 100,
                interval_s=(self._int_extra("rate_limit_interval_ms", 10_000) or 10_000) / 1000,
                burst_cap=burst_cap,
                daily=self._int_extra("rate_limit_daily", 200_000),
            ),
            max_workers=self._max_workers or self._int_extra("max_workers", DEFAULT_MAX_WORKERS),
            timeout=float(extras.get("timeout") or 30),
            verify=verify,
            proxies=proxies,
            retry=self._retry,
            log_pii=to_bool(extras.get("log_pii"), default=False),
        )

    @property
    def is_agency(self) -> bool:
        """
        Whether the connection is an agency's (extras ``company_id`` and ``app_id``).

        :raises GrowthHubConfigError: only one of the two extras is set.
        """
        present = {name: bool(self.extras.get(name)) for name in ("company_id", "app_id")}
        if present["company_id"] != present["app_id"]:
            missing = "app_id" if present["company_id"] else "company_id"
            given = "company_id" if missing == "app_id" else "app_id"
            raise GrowthHubConfigError(
                f"Connection {self.growthhub_conn_id!r}: extra {given} is set but {missing} is not; an "
                f"agency connection needs both, a location connection neither"
            )
        return present["company_id"]

    @cached_property
    def coordination(self) -> Coordination:
        """The shared state of this hook's location the connection's ``coordination`` extra names."""
        if self._coordination is not None:
            return self._coordination
        return self._coordination_at(self.config.location_id)

    def _coordination_at(self, location_key: str | None, *, agency: bool = False) -> Coordination:
        """
        The shared state of ``location_key`` (default ``local``).

        :param agency: the agency's own token state. Locally it gets a file of its own: a location's
            token is minted under that file's lock, and minting may refresh the agency's token.
        """
        config = self.config
        choice = str(self.extras.get("coordination") or LOCAL_COORDINATION).strip()
        if choice == LOCAL_COORDINATION:
            default = Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser() / "growthhub-tokens.json"
            token_file = Path(self.extras.get("refresh_token_file") or default)
            if agency:
                token_file = token_file.with_name(f"{token_file.stem}-agency{token_file.suffix}")
            return LocalCoordination(config.base_url, location_key, token_file)
        return self._redis_coordination(choice, location_key)

    def _redis_coordination(self, redis_conn_id: str, location_key: str | None) -> Coordination:
        from airflow.providers.redis.hooks.redis import RedisHook
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        from growthhub_provider.client.redis_coordination import RedisCoordination

        where = f"Connection {self.growthhub_conn_id!r}: extra coordination={redis_conn_id!r}"
        try:
            redis_conn = self.get_connection(redis_conn_id)
        except Exception as e:  # the Task SDK and the secrets backends raise their own kinds
            raise GrowthHubConfigError(
                f"{where} is neither 'local' nor the id of a connection ({type(e).__name__}: {e})"
            ) from None
        if redis_conn.conn_type != "redis":
            raise GrowthHubConfigError(
                f"{where} names a connection of type {redis_conn.conn_type!r}; it must be of type 'redis'"
            )
        client = RedisHook(redis_conn_id=redis_conn_id).get_conn()
        # RedisHook sets no timeouts and retries for up to ~20 s: a Redis that stops answering
        # must fail the task within seconds, not hang it.
        client.connection_pool.connection_kwargs.update(
            socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        client.set_retry(Retry(ExponentialBackoff(cap=0.5, base=0.05), 2))
        # A refresh request or an upsert never outlives these: the lock and the slot last longer.
        outlives_a_request = 2 * self.config.timeout + 5
        return RedisCoordination(
            client,
            self.config.base_url,
            location_key,
            lock_ttl_s=outlives_a_request,
            lease_s=outlives_a_request,
        )

    @cached_property
    def client(self) -> GrowthHubClient:
        """
        The client every call of this hook goes through, built once.

        :raises GrowthHubConfigError: an agency connection without a location to send to.
        """
        if not self.is_agency:
            return GrowthHubClient(
                self.config, coordination=self.coordination, logger=self.log, on_secret=mask_secret
            )
        if self.location_id is None:
            raise GrowthHubConfigError(
                f"Connection {self.growthhub_conn_id!r} is an agency connection: give the hook the "
                "location_id to send to"
            )
        return self.agency_client.location_client(
            self.location_id,
            coordination=self.coordination,
            max_workers=self._max_workers or self._int_extra("max_workers", None),
        )

    @cached_property
    def agency_client(self) -> AgencyClient:
        """
        The agency's own client: lists installed locations, mints location tokens.

        Its token state is keyed by the company, not by a location: every location of the agency
        must spend the one agency refresh token in turn.

        :raises GrowthHubConfigError: not an agency connection.
        """
        if not self.is_agency:
            raise GrowthHubConfigError(
                f"Connection {self.growthhub_conn_id!r} is not an agency connection "
                "(extras company_id, app_id)"
            )
        company_id = str(self.extras["company_id"])
        return AgencyClient(
            dataclasses.replace(self.config, location_id=None),
            company_id,
            str(self.extras["app_id"]),
            coordination=self._coordination_at(f"agency:{company_id}", agency=True),
            logger=self.log,
            on_secret=mask_secret,
        )

    def installed_locations(self, *, installed_only: bool = True) -> list[InstalledLocation]:
        """The agency's locations where the app is installed; see :meth:`AgencyClient.installed_locations`."""
        return self.agency_client.installed_locations(installed_only=installed_only)

    # -- what callers read ------------------------------------------------------------------------

    @property
    def location_id(self) -> str | None:
        """The location this hook serves: fills payloads that carry none and keys the limits."""
        return self.config.location_id

    @property
    def api_version(self) -> str:
        return self.config.api_version

    @property
    def max_workers(self) -> int:
        return self.config.max_workers

    @property
    def timeout(self) -> float:
        return self.config.timeout

    @property
    def limiter(self) -> RateLimiter:
        """The limiter shared by everything that sends to this location (see ``coordination``)."""
        return self.client.limiter

    @property
    def daily_remaining(self) -> int | None:
        """Daily quota left: the server's last figure less what went out since (at first: the limit)."""
        return self.client.daily_remaining

    @property
    def last_batch_stats(self) -> BatchStats | None:
        return self.client.last_batch_stats

    # -- HttpHook's interface ---------------------------------------------------------------------

    def get_conn(
        self, headers: dict[Any, Any] | None = None, extra_options: dict[str, Any] | None = None
    ) -> requests.Session:
        """
        A requests session set up as the client is (base headers, TLS, proxies), built once.

        For callers of ``HttpHook``'s interface only: the client sends over its own transport,
        and this session carries no token. Unlike
        ``HttpHook.get_conn``, connection extras never become headers: they hold secrets.

        :param headers: extra headers for every later request of this session.
        :param extra_options: ignored; options come from the connection extras.
        """
        session = self._session
        if headers:
            session.headers.update(headers)
        return session

    @cached_property
    def _session(self) -> requests.Session:
        config = self.config
        session = requests.Session()
        session.verify = config.verify
        session.proxies.update(config.proxies)
        session.trust_env = False  # proxies and CA bundle were read from the environment once
        session.headers.update(
            {"Accept": "application/json", "Content-Type": "application/json", "Version": config.api_version}
        )
        return session

    def test_connection(self) -> tuple[bool, str]:
        """
        Check base URL, token and Version by fetching a contact that does not exist (404 = fine);
        an agency connection by listing its installed locations.
        """
        try:
            return self.agency_client.check() if self.is_agency else self.client.check()
        except GrowthHubConfigError as e:
            return False, str(e)

    # -- the API ----------------------------------------------------------------------------------

    def upsert_contact(self, payload: dict[str, Any]) -> UpsertResult:
        """Create or update one contact; see :meth:`GrowthHubClient.upsert_contact`."""
        return self.client.upsert_contact(payload)

    def get_contact(self, contact_id: str) -> dict[str, Any]:
        """Fetch one contact; see :meth:`GrowthHubClient.get_contact`."""
        return self.client.get_contact(contact_id)

    def delete_contact(self, contact_id: str) -> bool:
        """Delete one contact (``False``: already gone); see :meth:`GrowthHubClient.delete_contact`."""
        return self.client.delete_contact(contact_id)

    def upsert_contacts(
        self, rows: Iterable[tuple[str, dict[str, Any]]], *, daily_reserve: int = 0
    ) -> Iterator[UpsertOutcome]:
        """Upsert many contacts concurrently; see :meth:`GrowthHubClient.upsert_contacts`."""
        return self.client.upsert_contacts(rows, daily_reserve=daily_reserve)
