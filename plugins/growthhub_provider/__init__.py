"""GrowthHub provider: the Airflow-free client of the GrowthHub API and the hook that is its Airflow face."""

from __future__ import annotations

from typing import Any


def get_provider_info() -> dict[str, Any]:
    """
    Describe the provider to Airflow's ``ProvidersManager`` (``apache_airflow_provider`` entry point).

    Connection form fields are declared here (``conn-fields``, Airflow 3.2+) rather than with
    ``get_connection_form_widgets`` so the UI can render them without importing the hook.
    ``package-name`` must equal the distribution name, or Airflow refuses the provider.
    """
    return {
        "package-name": "growthhub-sync",
        "name": "GrowthHub",
        "description": "Upsert contacts into the GrowthHub CRM (HighLevel / LeadConnector contacts API).\n",
        "integrations": [
            {
                "integration-name": "GrowthHub",
                "external-doc-url": "https://highlevel.stoplight.io/docs/integrations/",
                "tags": ["service"],
            }
        ],
        "hooks": [
            {
                "integration-name": "GrowthHub",
                "python-modules": ["growthhub_provider.hooks.growthhub"],
            }
        ],
        "connection-types": [
            {
                "hook-class-name": "growthhub_provider.hooks.growthhub.GrowthHubHook",
                "hook-name": "GrowthHub",
                "connection-type": "growthhub",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login"],
                    "relabeling": {"host": "Base URL", "password": "Private Integration / Access Token"},
                    "placeholders": {
                        "host": "https://services.leadconnectorhq.com",
                        "password": "pit-... (empty with OAuth; an agency's OAuth token for agencies)",
                    },
                },
                "conn-fields": {
                    "location_id": {
                        "label": "Location ID",
                        "description": "Sub-account (location) the token belongs to; filled into payloads.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "api_version": {
                        "label": "API Version",
                        "description": "Value of the Version header.",
                        "schema": {"type": ["string", "null"], "default": "2023-02-21"},
                    },
                    "client_id": {
                        "label": "OAuth Client ID",
                        "description": "Set with client secret and refresh token to use OAuth.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "client_secret": {
                        "label": "OAuth Client Secret",
                        "schema": {"type": ["string", "null"], "format": "password"},
                    },
                    "refresh_token": {
                        "label": "OAuth Refresh Token",
                        "description": "Initial refresh token; rotated tokens go to the refresh token store.",
                        "schema": {"type": ["string", "null"], "format": "password"},
                    },
                    "company_id": {
                        "label": "Agency Company ID",
                        "description": (
                            "Agency connections only (with App ID): the password is then the agency's "
                            "OAuth access token, and each location's token is minted from it."
                        ),
                        "schema": {"type": ["string", "null"]},
                    },
                    "app_id": {
                        "label": "Marketplace App ID",
                        "description": (
                            "Agency connections only (with Company ID): the app whose installed "
                            "locations are used."
                        ),
                        "schema": {"type": ["string", "null"]},
                    },
                    "coordination": {
                        "label": "Coordination",
                        "description": (
                            "Where the workers of this location share its rate limit and OAuth tokens: "
                            "'local' (this process, tokens in the file below; one host) or the id of a "
                            "Redis connection (Celery workers on several hosts)."
                        ),
                        "schema": {"type": ["string", "null"], "default": "local"},
                    },
                    "refresh_token_file": {
                        "label": "Token File",
                        "description": "With local coordination: the 0600 JSON file holding OAuth tokens.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "rate_limit_burst": {
                        "label": "Burst Limit",
                        "description": "Requests per burst interval (server headers may lower it).",
                        "schema": {"type": ["integer", "null"], "default": 100},
                    },
                    "rate_limit_interval_ms": {
                        "label": "Burst Interval (ms)",
                        "schema": {"type": ["integer", "null"], "default": 10000},
                    },
                    "rate_limit_daily": {
                        "label": "Daily Limit",
                        "schema": {"type": ["integer", "null"], "default": 200000},
                    },
                    "max_workers": {
                        "label": "Concurrent Requests",
                        "schema": {"type": ["integer", "null"], "default": 64},
                    },
                    "timeout": {
                        "label": "Timeout (s)",
                        "schema": {"type": ["number", "null"], "default": 30},
                    },
                },
            }
        ],
    }
