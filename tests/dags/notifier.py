"""A test notifier: every ``notify`` appends one JSON line to a file.

Configured as a ``custom`` alert channel (``class_path: notifier.FileNotifier``); importable in
the ``airflow dags test`` subprocess through ``PYTHONPATH=tests/dags``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airflow.sdk import BaseNotifier


class FileNotifier(BaseNotifier):
    """Appends ``{"text", "dag_id", "run_id"}`` per notification to ``path``."""

    template_fields = ("text",)

    def __init__(self, *, text: str, path: str) -> None:
        super().__init__()
        self.text = text
        self.path = path

    def notify(self, context: Mapping[str, Any]) -> None:
        dag = context.get("dag")
        dag_run = context.get("dag_run")
        line = {
            "text": self.text,
            "dag_id": getattr(dag, "dag_id", None),
            "run_id": context.get("run_id") or getattr(dag_run, "run_id", None),
        }
        with Path(self.path).open("a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")


def read_notifications(path: Path) -> list[dict[str, Any]]:
    """The notifications written to ``path`` so far (none when the file does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
