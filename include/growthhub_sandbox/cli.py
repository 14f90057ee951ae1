"""Command line of the sandbox server: parse options, load the config file, run uvicorn."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import uvicorn
import yaml

from growthhub_sandbox.app import create_app
from growthhub_sandbox.models import (
    DEFAULT_API_VERSIONS,
    RateLimitConfig,
    SandboxConfig,
    Settings,
    demo_config,
)

EPILOG = """\
Without --config the server has one location, "demo-location", and the fake token
"sandbox-demo-token" (scopes contacts.write, contacts.readonly). The config file (YAML or
JSON) has the shapes of the admin API:

  companies: {COMPANY_ID: {appId, locationTokenExpiresIn, locationScopes}}
  locations: {LOCATION_ID: {allowDuplicateContact, duplicateCheckFields, customFields, users, rateLimit,
              companyId, isInstalled, name, address}}
  tokens: [{token, userType, locationId, companyId, scopes, expiresIn, refreshToken, clientId, clientSecret}]
  faults: {seed, error_rate, timeout_rate, hang_seconds, drop_rate, phase, latency_ms, ...}

POST /_sandbox/reset restores it. With --state FILE the state survives restarts (SQLite); a
state file that already holds data wins over --config.
"""


def load_config(path: str | None) -> SandboxConfig:
    """The ``--config`` file (YAML is a superset of JSON), or the demo config."""
    if path is None:
        return demo_config()
    text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    return SandboxConfig.model_validate(data or {})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="growthhub-sandbox",
        description="Local GrowthHub contacts API for development, demos and tests.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    limits = RateLimitConfig()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON with locations, tokens, faults")
    parser.add_argument("--state", metavar="FILE", help="SQLite file that keeps state across restarts")
    parser.add_argument(
        "--api-versions",
        default=",".join(DEFAULT_API_VERSIONS),
        help="comma-separated accepted Version header values (default: %(default)s)",
    )
    parser.add_argument("--burst", type=int, default=limits.burst, help="requests per window (%(default)s)")
    parser.add_argument("--interval-ms", type=int, default=limits.intervalMs, help="window (%(default)s ms)")
    parser.add_argument("--daily", type=int, default=limits.daily, help="requests per UTC day (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for ids and faults (%(default)s)")
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        config=load_config(args.config),
        state_path=args.state,
        api_versions=tuple(v.strip() for v in args.api_versions.split(",") if v.strip()),
        rate_limit=RateLimitConfig(burst=args.burst, intervalMs=args.interval_ms, daily=args.daily),
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except (OSError, ValueError) as exc:
        sys.exit(f"growthhub-sandbox: bad --config: {exc}")
    # No access log: it costs throughput and would print request lines nobody asked for.
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        access_log=False,
        log_level=args.log_level,
        timeout_graceful_shutdown=2,
    )
