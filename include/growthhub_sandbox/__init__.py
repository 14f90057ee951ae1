"""A local GrowthHub (LeadConnector contacts v2) API server for development, demos and tests.

Run it with ``growthhub-sandbox --port 8765`` (or ``python -m growthhub_sandbox``). Without
``--config`` it serves one location, ``demo-location``, reachable with the fake token
``sandbox-demo-token`` (OAuth: client ``sandbox-demo-client`` / ``sandbox-demo-secret``,
refresh token ``sandbox-demo-refresh``). Tests use ``growthhub_sandbox.testing``.
"""

from __future__ import annotations

from growthhub_sandbox.app import create_app
from growthhub_sandbox.models import Settings

__all__ = ["Settings", "create_app"]
