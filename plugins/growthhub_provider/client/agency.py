"""
Agency connections: one agency (company) OAuth token for every location where the app is installed.

GrowthHub gives an agency no token that works on a location's contacts: the agency token lists the
locations where the app is installed (``GET /oauth/installedLocations``) and mints each of them an
access token of its own (``POST /oauth/locationToken``), valid about a day. :class:`AgencyClient`
speaks for the company; its token refreshes like any OAuth grant's (``user_type=Company``).
:meth:`AgencyClient.location_client` gives the client of one location, whose token is minted
instead of refreshed and kept in the location's token store, under the same refresh lock: the
workers of a location share one minted token until it expires or the API refuses it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlencode

from growthhub_provider.client.client import GrowthHubClient
from growthhub_provider.client.coordination import LocalCoordination, TokenState, fingerprint, renewal_time
from growthhub_provider.client.errors import (
    GrowthHubAuthError,
    GrowthHubBadResponse,
    GrowthHubConfigError,
    GrowthHubError,
    GrowthHubTransientError,
)
from growthhub_provider.client.responses import api_messages, body_kind, json_object, short
from growthhub_provider.client.settings import OAuthCredentials, location_workers

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable

    from growthhub_provider.client.coordination import Coordination
    from growthhub_provider.client.settings import ClientConfig
    from growthhub_provider.client.transport import Answer

LOCATIONS_ENDPOINT = "/oauth/installedLocations"
MINT_ENDPOINT = "/oauth/locationToken"
PAGE_SIZE = 100
"""The largest page ``/oauth/installedLocations`` serves."""


@dataclass(frozen=True)
class InstalledLocation:
    """A location of the agency as ``/oauth/installedLocations`` lists it."""

    id: str
    name: str
    installed: bool


class AgencyClient(GrowthHubClient):
    """
    The agency's own client: lists where the app is installed and mints location tokens.

    ``config.token`` is the agency (company) access token, ``config.oauth`` its grant (made a
    ``Company`` grant here). Private Integration Tokens cannot mint location tokens and are refused.
    The ``coordination`` keeps the agency's token state: give every worker of every location of
    the agency the same one (keyed by the company), or two of them would spend the agency's refresh
    token each and the second would find it spent. Locally it needs a token file of its own
    (default ``~/.growthhub-agency-tokens.json``): a location's token is minted under the lock of
    the location's file, and minting may refresh the agency's token under the agency's.

    :param company_id: the agency (company).
    :param app_id: the marketplace app whose installations are listed.
    """

    def __init__(
        self,
        config: ClientConfig,
        company_id: str,
        app_id: str,
        *,
        coordination: Coordination | None = None,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
        on_secret: Callable[[str], None] | None = None,
    ) -> None:
        if config.token and config.token.startswith("pit-"):
            raise GrowthHubConfigError(
                f"{config.name!r} is an agency connection: its token must be an agency OAuth access "
                "token; Private Integration Tokens cannot mint location tokens"
            )
        if config.oauth is not None:
            config = dataclasses.replace(config, oauth=dataclasses.replace(config.oauth, user_type="Company"))
        coordination = coordination or LocalCoordination(
            config.base_url, f"agency:{company_id}", Path.home() / ".growthhub-agency-tokens.json"
        )
        super().__init__(config, coordination=coordination, logger=logger, on_secret=on_secret)
        self.company_id = company_id
        self.app_id = app_id

    # -- installed locations ----------------------------------------------------------------------

    def installed_locations(self, *, installed_only: bool = True) -> list[InstalledLocation]:
        """
        The company's locations where the app is installed, every page of them.

        :param installed_only: ``False`` also returns the locations the API lists as not installed.
        :raises GrowthHubAuthError: the agency token is refused (401 after a refresh attempt, 403).
        """
        locations: list[InstalledLocation] = []
        while True:
            query = {"companyId": self.company_id, "appId": self.app_id, "skip": len(locations)}
            query["limit"] = PAGE_SIZE
            if installed_only:
                query["isInstalled"] = "true"
            endpoint = f"{LOCATIONS_ENDPOINT}?{urlencode(query)}"
            try:
                response = self.config.retry.retrying()(self._call, "GET", endpoint)
            except GrowthHubAuthError as e:
                raise type(e)(
                    f"Agency {self.config.name!r} cannot list the locations of company "
                    f"{self.company_id!r}: {e}"
                ) from None
            page, total = self._locations_page(response)
            locations += page
            if len(page) < PAGE_SIZE or (total is not None and len(locations) >= total):
                break
        return [location for location in locations if location.installed or not installed_only]

    @staticmethod
    def _locations_page(response: Answer) -> tuple[list[InstalledLocation], int | None]:
        """One page's locations and the ``count`` of all of them (if the answer says)."""
        data = json_object(response)
        rows = data.get("locations")
        if not isinstance(rows, list) or not all(isinstance(r, dict) and r.get("_id") for r in rows):
            raise GrowthHubBadResponse(
                response.status_code, f"no locations list of objects with an _id ({body_kind(response)})"
            )
        page = [
            InstalledLocation(str(r["_id"]), str(r.get("name") or ""), bool(r.get("isInstalled", True)))
            for r in rows
        ]
        count = data.get("count")
        return page, count if isinstance(count, int) else None

    def check(self) -> tuple[bool, str]:
        """Check base URL and agency token by listing the installed locations."""
        try:
            count = len(self.installed_locations())
        except GrowthHubError as e:
            return False, self._scrub(str(e))
        return True, (
            f"Connected to {self.base_url} as agency {self.company_id!r}: app {self.app_id!r} is "
            f"installed in {count} location{'' if count == 1 else 's'}"
        )

    # -- location tokens --------------------------------------------------------------------------

    def location_seed(self, location_id: str) -> str:
        """
        What the minted tokens of ``location_id`` descend from: the agency's grant and the location.

        A fingerprint, not a secret. An admin who re-authorises the agency changes it, so tokens
        minted with the old grant are ignored.
        """
        grant = self.config.oauth.refresh_token if self.config.oauth else self.config.token or ""
        return fingerprint(f"{grant}|{self.company_id}|{location_id}")

    def mint_location_token(self, location_id: str) -> TokenState:
        """
        A new access token for ``location_id`` (``POST /oauth/locationToken``), retrying transient errors.

        The state's ``refresh_token`` is :meth:`location_seed`: a minted token is renewed by minting
        again, never refreshed.

        :raises GrowthHubAuthError: 401 (after one agency token refresh) or 403, naming the location.
        :raises GrowthHubConfigError: 400/404/422: the company or the location is wrong.
        """
        where = f"Agency {self.config.name!r} minting a token for location {location_id!r}"
        try:
            response = self.config.retry.retrying()(self._post_mint, location_id)
        except GrowthHubAuthError as e:
            raise type(e)(f"{where}: {e}") from None
        if response.status_code >= 400:
            self._raise_mint_error(response, location_id, where)
        token, expires_in = self._minted(response, where)
        self._learn_secret(token)
        self.log.info("Minted an access token for location %s (agency %s)", location_id, self.config.name)
        return TokenState(self.location_seed(location_id), token, renewal_time(expires_in))

    def _post_mint(self, location_id: str) -> Answer:
        """One mint; a 401 gets the agency a newer token once and tries again (as ``_call`` does)."""
        response = self._send_mint(location_id)
        if response.status_code == 401 and self.config.oauth:
            used = response.request_headers.get("Authorization", "").removeprefix("Bearer ")
            self._refresh_access_token(stale=used)
            response = self._send_mint(location_id)
        if response.status_code == 429 or response.status_code >= 500:
            raise GrowthHubTransientError(response.status_code, "minting a location token failed")
        return response

    def _send_mint(self, location_id: str) -> Answer:
        self._ensure_access_token()
        form = {"companyId": self.company_id, "locationId": location_id}
        response = self._post_form(MINT_ENDPOINT, form, bearer=True)
        if response.problem and response.status_code < 400:
            raise GrowthHubBadResponse(response.status_code, response.problem)
        return response

    def _raise_mint_error(self, response: Answer, location_id: str, where: str) -> NoReturn:
        status = response.status_code
        said = self._scrub(short("; ".join(api_messages(response))))
        if status == 403 and "not installed" in said.lower():
            raise GrowthHubAuthError(
                f"{where}: 403: app {self.app_id!r} not installed in location {location_id!r}"
            )
        if status in (401, 403):
            raise GrowthHubAuthError(
                f"{where}: {status}: {said} (the agency token needs userType Company and scopes "
                "oauth.readonly, oauth.write)"
            )
        raise GrowthHubConfigError(f"{where}: {status}: {said} (check the company_id and the location id)")

    def _minted(self, response: Answer, where: str) -> tuple[str, Any]:
        """The token and lifetime of a 200; its body is never quoted (it holds the token)."""
        try:
            body = json_object(response)
        except GrowthHubBadResponse:
            body = {}
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise GrowthHubAuthError(
                f"{where}: {response.status_code} without an access_token ({body_kind(response)})"
            )
        return token, body.get("expires_in")

    def location_client(
        self, location_id: str, *, coordination: Coordination | None = None, max_workers: int | None = None
    ) -> GrowthHubClient:
        """
        The client of one location of the agency: a :class:`GrowthHubClient` whose token is minted.

        :param coordination: the location's shared state (limiter, minted token); default: local.
        :param max_workers: its requests in flight; default: what its rate limit can use
            (:func:`location_workers`), as one process may drive many locations.
        :raises GrowthHubConfigError: it keeps tokens in the agency's token file (minting would
            wait forever for the lock the location already holds).
        """
        workers = max_workers or location_workers(self.config.limits)
        client = _AgencyLocationClient(self, location_id, coordination=coordination, max_workers=workers)
        ours, theirs = self.coordination, client.coordination
        if (
            isinstance(ours, LocalCoordination)
            and isinstance(theirs, LocalCoordination)
            and ours.token_file.resolve() == theirs.token_file.resolve()
        ):
            raise GrowthHubConfigError(
                f"Location {location_id!r} of agency {self.config.name!r} keeps its tokens in the "
                f"agency's token file {ours.token_file}: give the agency a file of its own"
            )
        return client


class _AgencyLocationClient(GrowthHubClient):
    """
    A location client whose token the agency mints: renewing it (expired, or answered 401) mints.

    Everything else is the OAuth path of :class:`GrowthHubClient`: the location's token store and
    its refresh lock, so one worker mints while the others wait and then adopt its token. Its
    ``config.oauth`` names that grant: the agency's client id and :meth:`AgencyClient.location_seed`
    as seed; its ``name`` is ``<agency name>/<location>``, so the locations of one agency keep
    their tokens apart even in one token file.
    """

    def __init__(
        self, agency: AgencyClient, location_id: str, *, coordination: Coordination | None, max_workers: int
    ) -> None:
        grant = OAuthCredentials(
            client_id=agency.config.oauth.client_id if agency.config.oauth else agency.config.name,
            client_secret="",
            refresh_token=agency.location_seed(location_id),
        )
        config = dataclasses.replace(
            agency.config,
            name=f"{agency.config.name}/{location_id}",
            location_id=location_id,
            token=None,
            oauth=grant,
            max_workers=max_workers,
        )
        super().__init__(config, coordination=coordination, logger=agency.log, on_secret=agency._on_secret)
        self.agency = agency

    def _spend_refresh_token(self, refresh_token: str) -> TokenState:
        """Mint instead: a location of an agency has no refresh token of its own."""
        assert self.config.location_id is not None
        return self.agency.mint_location_token(self.config.location_id)
