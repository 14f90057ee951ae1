"""Data Docs that open offline: GX's pages without their CDN assets, and an index without JavaScript.

GX Core 1.x pages load Bootstrap, jQuery, bootstrap-table, Font Awesome and Vega from CDNs, and
its index builds the table of validations in the browser with bootstrap-table: without the
internet (a locked-down network, a laptop on a train) the index lists nothing and the pages are
unstyled. After GX has rendered, :func:`make_offline` drops every external script, stylesheet
and image, gives each page a small stylesheet of its own, and writes the index as a static table
with one link per validation, named by run, location and batch.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

Describe = Callable[[str], tuple[str, str, str]]
"""GX run name → (run, location, batch), the index's readable name of a validation."""

_EXTERNAL_TAG = re.compile(
    r"""<(script|link|img)\b[^>]*?\b(?:src|href)\s*=\s*["']?(?:https?:)?//[^>]*>(?:\s*</script>)?""",
    re.IGNORECASE,
)
_EXTERNAL_CSS_URL = re.compile(r"""url\(\s*['"]?(?:https?:)?//[^)]*\)""", re.IGNORECASE)
_MARKER = "<!-- growthhub: offline -->"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 1.5rem 2rem; color: #1f2328; }
a { color: #0b5cad; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
.row { display: flex; flex-wrap: wrap; gap: 1rem; }
.col-12, .col-md-12 { flex: 1 1 100%; }
.col-md-2, .col-lg-2 { flex: 0 0 14rem; }
.col-md-10, .col-lg-10 { flex: 1 1 40rem; min-width: 0; }
.card { border: 1px solid #d0d7de; border-radius: 4px; padding: .5rem 1rem; margin-bottom: 1rem; }
.navbar, .sticky, nav { padding: .5rem 0; }
.d-none, .invisible, .cooltip .top { display: none; }
.text-danger, .failed { color: #b3261e; } .text-success, .passed { color: #1a7f37; }
.fas.fa-check-circle::before, .fas.fa-check::before { content: "\\2714"; }
.fas.fa-times::before, .fas.fa-times-circle::before { content: "\\2718"; }
pre, code { white-space: pre-wrap; }
"""


def _strip_external(page: str) -> str:
    """The page without assets from other hosts, with :data:`STYLE` at the end of its head."""
    if _MARKER in page:
        return page
    page = _EXTERNAL_TAG.sub("", page)
    page = _EXTERNAL_CSS_URL.sub("none", page)
    return page.replace("</head>", f"{_MARKER}<style>{STYLE}</style></head>", 1)


@dataclass(frozen=True)
class _Validation:
    page: str
    """Path of the page, relative to the docs folder (``validations/<suite>/<run>/<time>/<batch>.html``)."""
    run: str
    location: str
    batch: str
    validated_at: str
    success: bool | None
    expectations: str


def _validations(docs: Path, results: Path, describe: Describe) -> list[_Validation]:
    out = []
    for page in (docs / "validations").glob("*/*/*/*.html"):
        rel = page.relative_to(docs)
        _, suite, run_name, run_time, _file = rel.parts
        success, expectations = None, ""
        result = results / suite / run_name / run_time / f"{page.stem}.json"
        if result.is_file():
            data = json.loads(result.read_text(encoding="utf-8"))
            success = data.get("success")
            stats = data.get("statistics") or {}
            met, evaluated = stats.get("successful_expectations"), stats.get("evaluated_expectations")
            expectations = f"{met}/{evaluated}"
        try:
            validated_at = datetime.strptime(run_time, "%Y%m%dT%H%M%S.%fZ").strftime("%Y-%m-%d %H:%M:%S UTC")
        except ValueError:
            validated_at = run_time
        out.append(_Validation(rel.as_posix(), *describe(run_name), validated_at, success, expectations))
    return sorted(out, key=lambda v: (v.validated_at, v.page), reverse=True)


def _index(validations: list[_Validation]) -> str:
    def cell(text: str) -> str:
        return f"<td>{html.escape(text)}</td>"

    rows = []
    for v in validations:
        status = {True: ("passed", "passed"), False: ("failed", "failed")}.get(v.success, ("", "?"))
        rows.append(
            "<tr>"
            f'<td class="{status[0]}">{status[1]}</td>'
            f'<td><a href="{html.escape(v.page)}">{html.escape(v.run)}</a></td>'
            f"{cell(v.location)}{cell(v.batch)}{cell(v.expectations)}{cell(v.validated_at)}"
            "</tr>"
        )
    body = "\n".join(rows) or '<tr><td colspan="6">No validation results yet.</td></tr>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>GrowthHub sync: data quality validations</title>
{_MARKER}<style>{STYLE}</style></head>
<body>
<h1>GrowthHub sync: data quality validations</h1>
<p>One Great Expectations validation per checked chunk of rows, newest first. A failed validation
means some rows of that chunk were quarantined; their reasons are in the quarantine table.</p>
<table>
<thead><tr><th>Result</th><th>Run</th><th>Location</th><th>Batch</th><th>Expectations met</th>
<th>Validated at</th></tr></thead>
<tbody>
{body}
</tbody></table>
</body></html>
"""


def make_offline(docs_dir: str | Path, results_dir: str | Path, describe: Describe) -> None:
    """Strip external assets from every page under ``docs_dir``; rewrite its ``index.html``."""
    docs = Path(docs_dir)
    for page in docs.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        stripped = _strip_external(text)
        if stripped != text:
            page.write_text(stripped, encoding="utf-8")
    index = _index(_validations(docs, Path(results_dir), describe))
    (docs / "index.html").write_text(index, encoding="utf-8")
