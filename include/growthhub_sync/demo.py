"""The demo source table ``crm_contacts``: created and filled with realistic generated contacts.

Deterministic for a seed. A share of the rows is bad on purpose (emails, phones, birth
dates, no identity at all, the same person twice) so a demo run shows every outcome.
PostgreSQL is filled with ``COPY`` and SQLite with the driver's ``executemany``, so a
million rows load in seconds for the benchmarks.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    Numeric,
    Table,
    Text,
    bindparam,
    case,
    cast,
    func,
    select,
    text,
    update,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

COLUMNS = (
    "id",
    "first_name",
    "last_name",
    "email",
    "phone",
    "date_of_birth",
    "gender",
    "address1",
    "city",
    "state",
    "postal_code",
    "country",
    "website",
    "timezone",
    "company_name",
    "tags",
    "source",
    "dnd",
    "lifetime_value",
    "updated_at",
)
DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)

_FIRST = [
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Carlos",
    "Sofia",
    "Wei",
    "Yuki",
    "Ahmed",
    "Fatima",
    "Olga",
    "Pierre",
    "Chloe",
    "Liam",
    "Emma",
    "Noah",
]
_LAST = [
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Clark",
    "Lewis",
]
_CITIES = (
    ("New York", "NY", "10001", "212", "America/New_York"),
    ("Chicago", "IL", "60601", "312", "America/Chicago"),
    ("San Francisco", "CA", "94103", "415", "America/Los_Angeles"),
    ("Austin", "TX", "73301", "512", "America/Chicago"),
    ("Boston", "MA", "02108", "617", "America/New_York"),
    ("Denver", "CO", "80202", "303", "America/Denver"),
    ("Miami", "FL", "33101", "305", "America/New_York"),
    ("Seattle", "WA", "98101", "206", "America/Los_Angeles"),
    ("Dolomite", "AL", "35061", "205", "America/Chicago"),
)
_DOMAINS = ("example.com", "mail.example.org", "corp.example.net", "example.co.uk")
_TAGS = ("customer", "lead", "vip", "newsletter", "webinar", "churn-risk", "trial", "partner")
_COMPANIES = ("Acme Corp", "Globex", "Initech", "Umbrella", "Hooli", "Stark Industries", None, None)
_STREETS = ("Main St", "Oak Ave", "1st St N", "Maple Dr", "Cedar Ln", "Elm St", "Park Blvd")
_SOURCES = ("warehouse", "web form", "import", "public api")


def contacts_table(schema: str | None = None, name: str = "crm_contacts") -> Table:
    """The demo table of issue 4 (text key, comma-separated tags, timestamptz updated_at)."""
    cols = [Column("id", Text, primary_key=True)]
    for c in COLUMNS[1:]:
        if c == "dnd":
            cols.append(Column(c, Boolean))
        elif c == "lifetime_value":
            cols.append(Column(c, Numeric(12, 2)))
        elif c == "updated_at":
            cols.append(Column(c, DateTime(timezone=True), nullable=False, index=True))
        else:
            cols.append(Column(c, Text))
    return Table(name, MetaData(schema=schema), *cols)


def _phone(rng: random.Random, area: str) -> str:
    exchange, line = rng.randint(201, 989), rng.randint(0, 9999)
    fmt = rng.random()
    if fmt < 0.4:
        return f"({area}) {exchange}-{line:04d}"
    if fmt < 0.7:
        return f"+1 {area} {exchange} {line:04d}"
    if fmt < 0.9:
        return f"{area}.{exchange}.{line:04d}"
    return f"{area}{exchange}{line:04d}"


def _dob(rng: random.Random) -> str:
    d = date(1940, 1, 1) + timedelta(days=rng.randrange(365 * 65))
    style = rng.randrange(4)
    return (d.isoformat(), d.strftime("%m/%d/%Y"), d.strftime("%Y.%m.%d"), d.strftime("%m-%d-%Y"))[style]


def generate(
    n: int,
    *,
    seed: int = 42,
    start: datetime = DEFAULT_START,
    span: timedelta = timedelta(days=1),
    bad_share: float = 0.03,
) -> Iterator[tuple[Any, ...]]:
    """Yield ``n`` rows in :data:`COLUMNS` order, ``updated_at`` spread over ``[start, start + span)``."""
    rng = random.Random(seed)
    span_us = max(1, int(span.total_seconds() * 1_000_000))
    recent: list[tuple[str, str]] = []
    for i in range(n):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        city, st, postal, area, tz = rng.choice(_CITIES)
        email: str | None = f"{first.lower()}.{last.lower()}{i}@{rng.choice(_DOMAINS)}"
        if rng.random() < 0.2:
            email = email.title()  # mixed case: normalisation lower-cases the domain
        phone: str | None = _phone(rng, area)
        dob: str | None = _dob(rng) if rng.random() < 0.8 else None
        roll = rng.random()
        if roll < bad_share:
            email = rng.choice(
                (f"{first}@", f"{first}.{last}.example.com", f"{first}@@example.com", f"{first} @x.io")
            )
        elif roll < 2 * bad_share:
            phone = rng.choice(("12345", "555-CALL-NOW", "+1 (000) 000-0000", "0"))
        elif roll < 3 * bad_share:
            dob = rng.choice(("31/12/1990", "1990-13-01", "2090-01-01", "12/31/90", "1990-02-30"))
        elif roll < 3.7 * bad_share:
            email = phone = None  # no identity at all
        elif roll < 4.2 * bad_share and recent:
            email, phone = rng.choice(recent)  # the same person again under another key
        elif rng.random() < 0.1:
            email = None  # phone-only contact: fine
        if email and phone and len(recent) < 1000:
            recent.append((email, phone))
        tags = ",".join(rng.sample(_TAGS, rng.randint(1, 3))) if rng.random() < 0.7 else None
        yield (
            f"C{i:08d}",
            first,
            last,
            email,
            phone,
            dob,
            rng.choice(("male", "female", "other", None)),
            f"{rng.randint(1, 9999)} {rng.choice(_STREETS)}",
            city,
            st,
            postal,
            "US",
            rng.choice((None, None, f"https://www.{last.lower()}.example.com")),
            tz,
            rng.choice(_COMPANIES),
            tags,
            rng.choice(_SOURCES),
            rng.random() < 0.05,
            round(rng.uniform(0, 5000), 2) if rng.random() < 0.6 else None,
            start + timedelta(microseconds=rng.randrange(span_us)),
        )


def create_demo_table(engine: Engine, *, schema: str | None = None, drop: bool = False) -> Table:
    tbl = contacts_table(schema)
    if schema and engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    if drop:
        tbl.drop(engine, checkfirst=True)
    tbl.create(engine, checkfirst=True)
    return tbl


def seed_demo(
    engine: Engine,
    n: int = 10_000,
    *,
    schema: str | None = None,
    seed: int = 42,
    start: datetime = DEFAULT_START,
    span: timedelta = timedelta(days=1),
    drop: bool = True,
    bad_share: float = 0.03,
) -> int:
    """(Re)create ``crm_contacts`` and load ``n`` generated rows; returns the row count."""
    tbl = create_demo_table(engine, schema=schema, drop=drop)
    insert_rows(engine, tbl, generate(n, seed=seed, start=start, span=span, bad_share=bad_share))
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(tbl)).scalar_one()


def insert_rows(engine: Engine, tbl: Table, rows: Iterator[Sequence[Any]], chunk: int = 50_000) -> None:
    """Bulk load rows in :data:`COLUMNS` order (COPY on PostgreSQL)."""
    batch: list[Sequence[Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= chunk:
            _load(engine, tbl, batch)
            batch = []
    if batch:
        _load(engine, tbl, batch)


def _load(engine: Engine, tbl: Table, rows: list[Sequence[Any]]) -> None:
    if engine.dialect.name == "postgresql":
        buf = io.StringIO()
        writer = csv.writer(buf)
        for r in rows:
            writer.writerow(["\\N" if v is None else v for v in r])
        buf.seek(0)
        name = f'"{tbl.schema}"."{tbl.name}"' if tbl.schema else f'"{tbl.name}"'
        raw = engine.raw_connection()
        try:
            copy = f"COPY {name} ({', '.join(COLUMNS)}) FROM STDIN WITH (FORMAT csv, NULL '\\N')"
            with raw.cursor() as cur:
                if hasattr(cur, "copy_expert"):  # psycopg2
                    cur.copy_expert(copy, buf)
                else:  # psycopg 3
                    with cur.copy(copy) as target:
                        target.write(buf.getvalue())
            raw.commit()
        finally:
            raw.close()
    else:
        with engine.begin() as conn:
            conn.execute(tbl.insert(), [dict(zip(COLUMNS, r, strict=True)) for r in rows])


def touch_contacts(
    engine: Engine, at: datetime, *, schema: str | None = None, keys: Sequence[str] | None = None
) -> int:
    """Bump ``updated_at`` without changing anything else (what an ELT reload does)."""
    tbl = contacts_table(schema)
    stmt = update(tbl).values(updated_at=at)
    if keys is not None:
        stmt = stmt.where(tbl.c.id.in_(list(keys)))
    with engine.begin() as conn:
        return conn.execute(stmt).rowcount


def modify_contacts(
    engine: Engine, keys: Sequence[str], at: datetime, *, schema: str | None = None, **values: Any
) -> int:
    """Change rows for real (default: a new city) and bump their ``updated_at`` to ``at``."""
    tbl = contacts_table(schema)
    values = {"updated_at": at, **(values or {"city": "Springfield"})}
    with engine.begin() as conn:
        return conn.execute(update(tbl).where(tbl.c.id.in_(list(keys))).values(**values)).rowcount


def spread_over_locations(
    engine: Engine, location_ids: Sequence[str], *, schema: str | None = None, column: str = "location_id"
) -> None:
    """Add ``column`` to ``crm_contacts`` and give row ``C<n>`` the location ``location_ids[n % len]``.

    What an agency's warehouse looks like: one table, a column naming each row's sub-account. Row
    numbers are the generated keys' digits, so the split is the same for every seed.
    """
    tbl = Table("crm_contacts", MetaData(schema=schema), Column("id", Text), Column(column, Text))
    name = f'"{schema}"."{tbl.name}"' if schema else f'"{tbl.name}"'
    with engine.begin() as conn:
        conn.execute(text(f'ALTER TABLE {name} ADD COLUMN "{column}" TEXT'))
        number = cast(func.substr(tbl.c.id, 2), Integer) % len(location_ids)
        whens = {i: bindparam(f"loc{i}", loc) for i, loc in enumerate(location_ids)}
        conn.execute(update(tbl).values({column: case(whens, value=number)}))
