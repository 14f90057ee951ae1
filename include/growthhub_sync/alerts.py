"""Alerting: which Airflow notifiers fire, and what their message says.

The config names the channels (Slack through the Slack provider, email through the SMTP provider,
or any ``BaseNotifier`` by import path); without any, an alert is one clear ERROR log line. The
message is the same everywhere: DAG, run, location, counts, top reason codes, link to the run.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from growthhub_sync.config import AlertsConfig, EmailChannel, SlackChannel
from growthhub_sync.reasons import describe

if TYPE_CHECKING:
    from airflow.sdk import BaseNotifier

log = logging.getLogger(__name__)


def format_alert(
    *,
    headline: str,
    dag_id: str,
    run_id: str,
    locations: Sequence[str],
    counts: Mapping[str, int],
    top_errors: Sequence[tuple[str, int]],
    run_url: str | None,
) -> str:
    """One message shape for every channel: what happened, where, how much, and where to look."""
    lines = [
        f"GrowthHub sync: {headline}",
        f"DAG {dag_id}, run {run_id}",
        f"locations: {', '.join(locations) or '-'}",
    ]
    if counts:
        lines.append("counts: " + ", ".join(f"{name}={value}" for name, value in counts.items()))
    if top_errors:
        lines.append("top errors:")
        lines.extend(f"  {count} x {describe(reason)}" for reason, count in top_errors)
    if run_url:
        lines.append(f"run: {run_url}")
    return "\n".join(lines)


def build_notifiers(config: AlertsConfig, text: str) -> list[BaseNotifier]:
    """Instantiate the configured notifiers for one message (imports providers only when used)."""
    notifiers: list[BaseNotifier] = []
    for channel in config.channels:
        if isinstance(channel, SlackChannel):
            from airflow.providers.slack.notifications.slack import SlackNotifier

            notifiers.append(SlackNotifier(slack_conn_id=channel.conn_id, channel=channel.channel, text=text))
        elif isinstance(channel, EmailChannel):
            from airflow.providers.smtp.notifications.smtp import SmtpNotifier

            subject = text.splitlines()[0]
            notifiers.append(
                SmtpNotifier(
                    to=channel.to,
                    smtp_conn_id=channel.conn_id,
                    subject=subject,
                    html_content=f"<pre>{html.escape(text)}</pre>",
                )
            )
        else:
            notifiers.append(channel.class_path(text=text, **channel.kwargs))
    return notifiers


def send_alert(
    config: AlertsConfig, text: str, context: Mapping[str, Any], *, level: int = logging.ERROR
) -> None:
    """Log the alert, then hand it to every configured notifier; one failing channel spares the rest.

    ``level``: ERROR for a failed run; a run that succeeded over a threshold logs a WARNING, so a
    successful run's logs hold no ERROR line.
    """
    log.log(level, "%s", text)
    for notifier in build_notifiers(config, text):
        try:
            notifier.notify(dict(context))
        except Exception:
            log.exception("alert channel %s failed", type(notifier).__name__)
