"""Quality checks as a Great Expectations (GX Core 1.x) suite, validated per batch.

The suite asserts on the columns :mod:`growthhub_sync.mapping` produced, as the field registry
(:mod:`growthhub_sync.fields`) declares them: validity flags of the normalisers (email, phone,
date of birth, website, country, time zone), small enums checked by GX itself (gender, dnd
statuses), the E.164 / ISO-date shape of normalised values, and the presence of an identity.
``COMPLETE`` results give the failing row indexes, turned into reasons per row. Each batch's
validation result is stored as JSON under ``results_dir``; :func:`build_data_docs` renders them
as HTML under ``data_docs_dir``.

Both are folders of GX's ``TupleFilesystemStoreBackend``: GX Core 1.x ships no S3, GCS or Azure
store backend. The batches of one run may validate on several Celery workers and the run's finalize
task renders all their results on another, so with workers on several hosts both must be absolute
paths on a volume every worker mounts.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from growthhub_sync.data_docs import Describe, make_offline
from growthhub_sync.fields import DND_STATUSES, FIELDS, INBOUND_DND_STATUSES, NORMALISED

if TYPE_CHECKING:
    import pandas as pd

    from growthhub_sync.config import SyncConfig

log = logging.getLogger(__name__)

SUITE_NAME = "growthhub_contacts"


def _quiet_gx() -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
        logging.getLogger(name).setLevel(logging.ERROR)


@dataclass(frozen=True)
class _Check:
    check: str
    """Config name of the check (``quality.errors`` entries)."""
    expectation: Any
    message: str
    """Reason when the normaliser gave none; ``{value}`` is the offending value."""
    value_column: str | None = None


def _expectations(config: SyncConfig, present: set[str]) -> list[_Check]:
    """The suite for the check columns ``present``; its order is the order of a row's reasons."""
    import great_expectations.expectations as gxe

    checks = [
        _Check(
            "identity",
            gxe.ExpectColumnValuesToNotBeNull(column="identity"),
            "identity: neither an email nor a phone given",
        )
    ]
    # Normalisers decide these (libraries know the rules; a 600-value set in GX would cost
    # ~0.2 s per batch in configuration overhead); GX asserts and reports their verdicts.
    checks += [
        _Check(
            f.check, gxe.ExpectColumnValuesToBeInSet(column=f"{f.key}_ok", value_set=[True]), f.invalid, f.key
        )
        for f in NORMALISED
        if f.check and f"{f.key}_ok" in present
    ]
    checks += [
        _Check(
            f.check, gxe.ExpectColumnValuesToMatchRegex(column=f.key, regex=f.shape), f.shape_reason, f.key
        )
        for f in FIELDS
        if f.check and f.shape and f.key in present
    ]
    for f in FIELDS:
        if f.check and f.choices and f.key in present:
            checks.append(_one_of(f.check, f.key, f.key, getattr(config.quality, f.choices)))
    for col in sorted(c for c in present if c.startswith("dnd_")):
        allowed = INBOUND_DND_STATUSES if col == "dnd_inbound" else DND_STATUSES
        label = "inboundDndSettings" if col == "dnd_inbound" else f"dndSettings.{col[4:]}"
        checks.append(_one_of("dnd", col, label, allowed))
    return checks


def _one_of(check: str, column: str, label: str, allowed: Sequence[str]) -> _Check:
    """A small enum GX checks itself: the allowed values are few, and the config's or the API's."""
    import great_expectations.expectations as gxe

    return _Check(
        check,
        gxe.ExpectColumnValuesToBeInSet(column=column, value_set=list(allowed)),
        f"{label}: {{value!r}} is not one of {', '.join(allowed)}",
        column,
    )


@dataclass
class CheckResult:
    """Failed checks per row index: ``{index: {check: reason}}``, plus GX's verdict."""

    failures: dict[int, dict[str, str]]
    success: bool
    statistics: dict[str, Any]


class QualityChecker:
    """One GX context, suite and validation definition, reused for every batch of a process."""

    def __init__(self, config: SyncConfig, columns: Sequence[str], *, keep_results: bool = True) -> None:
        _quiet_gx()
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        self.config = config
        q = config.quality
        ctx_cfg = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
            data_docs_sites={"growthhub": _site(q.data_docs_dir)},
        )
        if keep_results:
            # every task process of a run writes its batches' results here
            ctx_cfg.stores["validation_results_store"] = {
                "class_name": "ValidationResultsStore",
                "store_backend": _folder_backend(q.results_dir),
            }
        self.context = gx.get_context(mode="ephemeral", project_config=ctx_cfg)
        self.checks = _expectations(config, set(columns))
        suite = gx.ExpectationSuite(name=SUITE_NAME)
        for c in self.checks:
            suite.add_expectation(c.expectation)
        suite = self.context.suites.add(suite)
        asset = self.context.data_sources.add_pandas("warehouse").add_dataframe_asset("contacts")
        self.definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(
                name="contacts_batch", data=asset.add_batch_definition_whole_dataframe("batch"), suite=suite
            )
        )
        self.keep_results = keep_results

    def validate(self, frame: pd.DataFrame, reasons: Sequence[dict[str, str]], run_name: str) -> CheckResult:
        """Validate one batch; ``reasons`` are the normalisers' per-row explanations."""
        from great_expectations.core.run_identifier import RunIdentifier

        if frame.empty:
            return CheckResult({}, True, {})
        with _GX_LOCK:  # one GX context per process: the fleet's location threads take turns
            result = self.definition.run(
                batch_parameters={"dataframe": frame},
                result_format={"result_format": "COMPLETE", "partial_unexpected_count": 0},
                run_id=RunIdentifier(run_name=run_name),
            )
        failures: dict[int, dict[str, str]] = {}
        for check, er in zip(self.checks, result.results, strict=True):
            if er.success:
                continue
            for idx in er.result.get("unexpected_index_list") or []:
                row = failures.setdefault(int(idx), {})
                if check.check in row:
                    continue
                value = frame.at[idx, check.value_column] if check.value_column else None
                row[check.check] = reasons[idx].get(check.check) or check.message.format(value=value)
        return CheckResult(failures, bool(result.success), dict(result.statistics))

    def build_data_docs(self, run_prefix: str | None = None, describe: Describe | None = None) -> str:
        """Render stored validation results to HTML (only runs named ``run_prefix*`` if given).

        The pages open offline and the index lists every validation of the folder, named by
        ``describe`` (run name → run, location, batch; see :func:`make_offline`). Returns the
        index page's URL. Pages of earlier runs stay in the folder.
        """
        ids = None
        if run_prefix is not None:
            store = self.context.validation_results_store
            ids = [k for k in store.list_keys() if str(k.run_id.run_name or "").startswith(run_prefix)]
            if not ids:
                return Path(self.config.quality.data_docs_dir, "index.html").resolve().as_uri()
        url = self.context.build_data_docs(site_names=["growthhub"], resource_identifiers=ids)["growthhub"]
        q = self.config.quality
        make_offline(q.data_docs_dir, q.results_dir, describe or (lambda name: (name, "", "")))
        return url


def _folder_backend(folder: str) -> dict[str, Any]:
    """GX's filesystem store backend on ``folder``, a relative one fixed to this process's directory."""
    return {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(folder).resolve())}


def _site(folder: str) -> dict[str, Any]:
    return {
        "class_name": "SiteBuilder",
        "store_backend": _folder_backend(folder),
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }


_GX_LOCK = threading.RLock()
_CHECKERS: dict[tuple[str, tuple[str, ...], bool], QualityChecker] = {}


def checker_for(config: SyncConfig, columns: tuple[str, ...], keep_results: bool) -> QualityChecker:
    """One GX context per process and config: building it costs as much as validating ~50k rows."""
    key = (config.model_dump_json(), columns, keep_results)
    with _GX_LOCK:
        if key not in _CHECKERS:
            _CHECKERS[key] = QualityChecker(config, columns, keep_results=keep_results)
        return _CHECKERS[key]


def check_columns(config: SyncConfig) -> list[str]:
    """The check columns the mapper produces for ``config`` (finalize's key into :func:`checker_for`)."""
    from datetime import UTC, datetime

    from growthhub_sync.mapping import Mapper

    cols = config.source_columns()
    row: list[Any] = [None] * len(cols)
    row[cols.index(config.source.updated_at_column)] = datetime.now(UTC)
    return list(Mapper(config, cols).map([row], "x").frame.columns)
