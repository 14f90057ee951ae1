"""
The GrowthHub API client, free of Airflow: usable from any Python process and tested on its own.

:class:`GrowthHubClient` speaks HTTP to one location, :class:`AgencyClient` for an agency (its
installed locations, their minted tokens); :mod:`.coordination` keeps what the workers
of that location share (``local`` here; ``redis`` in :mod:`.redis_coordination`).
"""

from __future__ import annotations

from growthhub_provider.client.agency import AgencyClient, InstalledLocation
from growthhub_provider.client.batch import BatchStats, OutcomeStatus, UpsertOutcome
from growthhub_provider.client.client import GrowthHubClient, UpsertResult
from growthhub_provider.client.coordination import (
    Coordination,
    FileTokenStore,
    LimitSettings,
    LocalCoordination,
    RateLimiter,
    TokenState,
    TokenStore,
)
from growthhub_provider.client.errors import (
    CoordinationError,
    GrowthHubAuthError,
    GrowthHubBadResponse,
    GrowthHubBrokenBody,
    GrowthHubConfigError,
    GrowthHubConnectionError,
    GrowthHubDailyQuotaSpent,
    GrowthHubError,
    GrowthHubNotFound,
    GrowthHubRejected,
    GrowthHubTimeout,
    GrowthHubTransientError,
    GrowthHubTransportError,
)
from growthhub_provider.client.responses import identity_keys
from growthhub_provider.client.settings import (
    ClientConfig,
    OAuthCredentials,
    RetryPolicy,
    tls_verify,
    to_bool,
)

__all__ = [
    "AgencyClient",
    "BatchStats",
    "ClientConfig",
    "Coordination",
    "CoordinationError",
    "FileTokenStore",
    "GrowthHubAuthError",
    "GrowthHubBadResponse",
    "GrowthHubBrokenBody",
    "GrowthHubClient",
    "GrowthHubConfigError",
    "GrowthHubConnectionError",
    "GrowthHubDailyQuotaSpent",
    "GrowthHubError",
    "GrowthHubNotFound",
    "GrowthHubRejected",
    "GrowthHubTimeout",
    "GrowthHubTransientError",
    "GrowthHubTransportError",
    "InstalledLocation",
    "LimitSettings",
    "LocalCoordination",
    "OAuthCredentials",
    "OutcomeStatus",
    "RateLimiter",
    "RetryPolicy",
    "TokenState",
    "TokenStore",
    "UpsertOutcome",
    "UpsertResult",
    "identity_keys",
    "tls_verify",
    "to_bool",
]
