"""A full sync with a known token leaves the token nowhere and personal data only masked (issue 6).

The library's ``sync`` runs through the real hook against the sandbox, with injected 500s and a
429 storm (retry paths log), an OAuth variant whose access token has expired (refresh path logs),
and three rows the API rejects with a message quoting an email (the sandbox names the unknown
``assignedTo`` user). Everything is scanned: log records at DEBUG (root, the client's transport, the hook,
the library), stdout, the returned summary (what the DAG pushes to XCom), every ledger,
quarantine, pending and run row, the GX validation results on disk and the sandbox's own log.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from reliability_support import (
    LOCATION_ID,
    TOKEN,
    Warehouse,
    growthhub_conn,
    ledger,
    make_config,
    pending,
    quarantine,
    runs,
    setup_sandbox_location,
    source_rows,
)
from sqlalchemy import update

from growthhub_provider.client import FileTokenStore
from growthhub_provider.hooks.growthhub import GrowthHubHook
from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess
from growthhub_sync.demo import contacts_table, seed_demo
from growthhub_sync.normalise import normalise_phone
from growthhub_sync.pipeline import SyncOptions, sync

pytestmark = pytest.mark.integration

EXPIRED_ACCESS = "at-SECRET-expired-rel-0001"
SEED_REFRESH = "rt-SECRET-seed-rel-0001"
CLIENT_ID = "cid-rel"
CLIENT_SECRET = "cs-SECRET-rel-0001"
ISSUED_ACCESS = "at-SECRET-issued-rel-0001"
LEAKY = [f"leaky.person{i}@example.com" for i in range(3)]
ROWS = 200


@dataclass
class Scan:
    summary: dict[str, Any]
    logs: str
    state_rows: str
    gx_files: str
    sandbox_log: str
    secrets: list[str]
    emails: set[str]
    phones: set[str]


def _record_texts(caplog: pytest.LogCaptureFixture) -> list[str]:
    formatter = logging.Formatter()
    out = []
    for r in caplog.records:
        exc = r.exc_text or (formatter.formatException(r.exc_info) if r.exc_info else "")
        out.append(f"{r.getMessage()}\n{r.msg!r}\n{r.args!r}\n{exc}")
    return out


def _personal_data(wh: Warehouse, cfg: Any) -> tuple[set[str], set[str]]:
    cols, rows = source_rows(wh, cfg)
    ei, pi = cols.index("email"), cols.index("phone")
    emails = {str(r[ei]) for r in rows if r[ei] and "@" in str(r[ei])} | set(LEAKY)
    emails |= {e.lower() for e in emails}
    phones: set[str] = set()
    for r in rows:
        if r[pi]:
            phones.add(str(r[pi]))
            e164, _ = normalise_phone(str(r[pi]), "US")
            if e164:
                phones.add(e164)
    return emails, {p for p in phones if len(re.sub(r"\D", "", p)) >= 7}


@pytest.fixture(params=["private-token", "oauth-refresh"])
def scanned(
    request: pytest.FixtureRequest,
    rel_warehouse: Warehouse,
    tmp_path: Path,
    sandbox: SandboxAdmin,
    sandbox_server: SandboxProcess,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> Scan:
    wh = rel_warehouse
    seed_demo(wh.engine, ROWS, schema=wh.schema, seed=6)
    tbl = contacts_table(wh.schema)
    with wh.engine.begin() as conn:
        for i, email in enumerate(LEAKY):  # rejected by the API, the message quoting the email
            conn.execute(update(tbl).where(tbl.c.id == f"C{i + 10:08d}").values(source=email))
    base = make_config(wh, tmp_path)
    mapping = base.mapping.model_dump(by_alias=True, exclude_none=True)
    mapping["fields"]["assignedTo"] = {"column": "source"}
    cfg = make_config(wh, tmp_path, mapping=mapping)

    setup_sandbox_location(sandbox)
    sandbox.put_location(
        LOCATION_ID,
        duplicateCheckFields=["email", "phone"],
        customFields=[{"id": "cf-ltv", "key": "lifetime_value", "dataType": "MONETORY"}],
        users=["warehouse", "web form", "import", "public api"],
        rateLimit={"burst": 1_000_000_000, "intervalMs": 1_000, "daily": 1_000_000_000},
    )
    secrets = [TOKEN]
    if request.param == "oauth-refresh":
        sandbox.add_token(
            token=ISSUED_ACCESS,
            locationId=LOCATION_ID,
            scopes=["contacts.write"],
            expiresIn=3600,
            refreshToken=SEED_REFRESH,
            clientId=CLIENT_ID,
            clientSecret=CLIENT_SECRET,
        )
        conn = growthhub_conn(
            sandbox_server.base_url,
            tmp_path,
            token=EXPIRED_ACCESS,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            refresh_token=SEED_REFRESH,
        )
        secrets += [EXPIRED_ACCESS, SEED_REFRESH, CLIENT_SECRET, ISSUED_ACCESS]
    else:
        conn = growthhub_conn(sandbox_server.base_url, tmp_path)
    monkeypatch.setenv("AIRFLOW_CONN_GROWTHHUB_DEFAULT", conn)
    sandbox.set_faults(seed=3, error_rate=0.1, error_statuses=[500, 503], storm_every_n=60, storm_length=1)

    caplog.set_level(logging.DEBUG)
    for name in ("urllib3", "requests", "growthhub_provider", "growthhub_sync", "airflow"):
        caplog.set_level(logging.DEBUG, logger=name)
    hooks: list[GrowthHubHook] = []

    def make_hook(_location: Any) -> GrowthHubHook:
        hook = GrowthHubHook(max_attempts=10, backoff_initial_s=0.01, backoff_max_s=0.05)
        hook._log = logging.getLogger("growthhub_provider.hooks.growthhub")  # DEBUG reaches caplog
        hooks.append(hook)
        return hook

    summary = sync(
        cfg,
        "default",
        None,
        SyncOptions(run_id="secrets", dag_id="tests"),
        engine=wh.engine,
        upserter=make_hook,
    )
    if request.param == "oauth-refresh":
        assert sandbox.stats()["requests"]["POST /oauth/token"] == {"200": 1}
        new_refresh = (
            FileTokenStore(tmp_path / "rt.json", "growthhub_default").load(SEED_REFRESH).refresh_token
        )
        secrets += [s for s in (hooks[0].client._access_token, new_refresh) if s and s not in secrets]
    stats = sandbox.stats()["requests"]["POST /contacts/upsert"]
    assert {"200", "422", "429", "500"} <= stats.keys(), stats  # every logging path was walked
    emails, phones = _personal_data(wh, cfg)
    state_dump = json.dumps(
        [ledger(wh, cfg), quarantine(wh, cfg), pending(wh, cfg), runs(wh, cfg)],
        default=str,
        ensure_ascii=False,
    )
    gx = "\n".join(
        p.read_text(errors="replace")
        for p in (tmp_path / "gx").rglob("*")
        if p.is_file() and p.suffix in {".json", ".html"}
    )
    logs = "\n".join(_record_texts(caplog)) + caplog.text + "".join(capsys.readouterr())
    server_log = Path(sandbox_server.log_path).read_text(errors="replace") if sandbox_server.log_path else ""
    return Scan(summary, logs, state_dump, gx, server_log, secrets, emails, phones)


def test_full_sync_leaves_no_token_anywhere_and_personal_data_only_masked(scanned: Scan) -> None:
    # the sync walked every path under scan
    assert scanned.summary["invariant_ok"]
    assert 1 <= scanned.summary["rejected"] <= len(LEAKY)  # a leaky row may fail a quality check first
    assert scanned.summary["created"] > 100
    assert "GrowthHub batch" in scanned.logs
    assert '"POST /contacts/upsert" 200' in scanned.logs, "the transport's DEBUG was captured"

    # the token (and OAuth secrets) nowhere
    places = {
        "logs": scanned.logs,
        "xcom summary": json.dumps(scanned.summary, default=str),
        "state tables": scanned.state_rows,
        "gx results": scanned.gx_files,
        "sandbox log": scanned.sandbox_log,
    }
    found = sorted(
        (name, secret) for name, text in places.items() for secret in scanned.secrets if secret in text
    )
    assert found == []
    assert not re.search(r"Bearer\s+[A-Za-z0-9._-]{8,}", "\n".join(places.values()))

    # emails and phones masked in logs, the XCom summary and the run row (a copy of the summary)
    run_rows = json.dumps(json.loads(scanned.state_rows)[3], ensure_ascii=False)
    personal = scanned.emails | scanned.phones
    leaks = {
        name: sorted(p for p in personal if p in text)
        for name, text in {
            "logs": scanned.logs,
            "xcom summary": json.dumps(scanned.summary, default=str, ensure_ascii=False),
            "growthhub_sync_runs.details": run_rows,
        }.items()
    }
    assert leaks == {"logs": [], "xcom summary": [], "growthhub_sync_runs.details": []}
    assert "l***@***.com" in json.dumps(scanned.summary), "the API message is kept, masked"
