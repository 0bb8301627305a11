"""Where the experiment ledger lives: a SQLite file (the default) or a PostgreSQL database.

The drivers are the standard library's ``sqlite3`` and ``psycopg`` (3), not SQLAlchemy Core:
the ledger runs a handful of statements that are portable SQL as written (``ON CONFLICT``,
``RETURNING``, row values and savepoints work in SQLite >= 3.35 and PostgreSQL >= 10), and
the dialects differ only in the placeholder (``?`` or ``%s``), the connection settings and
how a transaction skips its flush. ``Database`` covers that in a few lines; SQLAlchemy would
add a large dependency and a connection pool where one connection per ledger thread is all
there is.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from randkit.errors import UserError

DEFAULT_FILE = Path(".randkit") / "ledger.sqlite"  # inside the model repository
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another process's transaction
POSTGRES_SCHEMES = ("postgresql", "postgres")

SCHEMA = (
    # One row per answered input; the label once feedback arrives. Expires by `created`.
    """CREATE TABLE IF NOT EXISTS randkit_predictions (
        model TEXT NOT NULL,
        id TEXT NOT NULL,
        version TEXT NOT NULL,
        predicted INTEGER NOT NULL,
        routed INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        label INTEGER,
        labelled DOUBLE PRECISION,
        PRIMARY KEY (model, id))""",
    "CREATE INDEX IF NOT EXISTS randkit_predictions_created ON randkit_predictions (created)",
    # Running totals of routed predictions per policy epoch: they outlive expired rows.
    """CREATE TABLE IF NOT EXISTS randkit_counts (
        model TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        version TEXT NOT NULL,
        requests BIGINT NOT NULL,
        labelled BIGINT NOT NULL,
        correct BIGINT NOT NULL,
        PRIMARY KEY (model, epoch, version))""",
    # Each routed label's outcome in its version's label order (seq 1, 2, ...): the
    # anytime-valid test (sequential.py) needs the order; it outlives expired rows too.
    """CREATE TABLE IF NOT EXISTS randkit_outcomes (
        model TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        version TEXT NOT NULL,
        seq BIGINT NOT NULL,
        correct INTEGER NOT NULL,
        PRIMARY KEY (model, epoch, version, seq))""",
    # A model's policy epochs: a new one starts when a load brings another policy.
    """CREATE TABLE IF NOT EXISTS randkit_epochs (
        model TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        fingerprint TEXT NOT NULL,
        started DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (model, epoch))""",
    "CREATE TABLE IF NOT EXISTS randkit_ledger (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


def is_postgres(location: str) -> bool:
    return urlsplit(location).scheme.lower() in POSTGRES_SCHEMES


def shown_location(location: str) -> str:
    """The location for messages and logs, with any password masked."""
    if not is_postgres(location):
        return location
    parts = urlsplit(location)
    if parts.password is None:
        return location
    netloc = parts.netloc.rsplit("@", 1)
    masked = re.sub(r":[^:]*$", ":***", netloc[0]) + "@" + netloc[1]
    return urlunsplit(parts._replace(netloc=masked))


def ledger_location(ledger: str | None, repository: Path) -> str:
    """``--ledger`` as a location: a postgresql:// URL, or a SQLite file path (the default
    ``REPO/.randkit/ledger.sqlite``). ``sqlite:///PATH`` names a file as SQLAlchemy does:
    ``sqlite:///ledger.sqlite`` is relative, ``sqlite:////data/ledger.sqlite`` absolute."""
    if ledger is None:
        return str(repository / DEFAULT_FILE)
    if ledger.startswith("sqlite:///"):
        return ledger[len("sqlite:///") :]
    return ledger


def check_location(ledger: str | None, repository: Path) -> str:
    """The ledger location, or a one-line ``UserError`` naming ``--ledger``."""
    location = ledger_location(ledger, repository)
    if location == ":memory:":
        return location
    scheme = urlsplit(location).scheme.lower()
    if scheme in POSTGRES_SCHEMES:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise UserError(
                "--ledger", "a PostgreSQL ledger needs psycopg: pip install 'randkit[serve]'"
            ) from None
        if not urlsplit(location).path.strip("/") and "dbname=" not in location:
            example = shown_location(location).rstrip("/") + "/randkit"
            raise UserError("--ledger", f"name the database, e.g. {example}")
        return location
    if "://" in location:
        raise UserError(
            "--ledger",
            f"unknown scheme {scheme!r} in {shown_location(location)!r}; give a SQLite file "
            "path or a postgresql://USER@HOST/DATABASE URL",
        )
    path = Path(location)
    if path.is_dir():
        raise UserError("--ledger", f"{location!r} is a directory; give a file path")
    folder = path.parent
    if ledger is not None and not folder.is_dir():
        raise UserError("--ledger", f"folder {str(folder)!r} does not exist")
    return location


class Database:
    """One connection (SQLite or PostgreSQL) and the few dialect differences the ledger
    meets. Not thread-safe: the ledger's own thread is its only user."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.postgres = is_postgres(location)
        self.connection: Any = None

    def open(self) -> None:
        if self.connection is not None:
            return
        if self.postgres:
            import psycopg

            self.connection = psycopg.connect(
                self.location, autocommit=False, connect_timeout=10, application_name="randkit"
            )
        else:
            self._open_sqlite()
        self._create_schema()

    def _open_sqlite(self) -> None:
        path = self.location
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are ours (BEGIN IMMEDIATE), not the module's.
        connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            # WAL: readers never block the writer, and several processes share the file.
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            connection.close()
            raise
        self.connection = connection

    def _create_schema(self) -> None:
        self.begin(write=True, durable=True)
        try:
            if self.postgres:  # concurrent CREATE TABLE IF NOT EXISTS can race in PostgreSQL
                self.rows("SELECT pg_advisory_xact_lock(727001)")
            for statement in SCHEMA:
                self.rows(statement)
            self.rows(
                "INSERT INTO randkit_ledger (key, value) VALUES ('schema', ?) "
                "ON CONFLICT (key) DO NOTHING",
                (str(SCHEMA_VERSION),),
            )
            (found,) = self.rows("SELECT value FROM randkit_ledger WHERE key = 'schema'")
            self.commit()
        except BaseException:
            self.rollback()
            raise
        if found[0] != str(SCHEMA_VERSION):
            raise RuntimeError(f"ledger schema {found[0]}, this randkit reads {SCHEMA_VERSION}")

    def begin(self, write: bool, durable: bool) -> None:
        """Start a transaction. ``durable``: its commit reaches the disk before it returns
        (SQLite FULL, PostgreSQL's synchronous commit); otherwise it survives a crash of
        this process but not necessarily of the machine (SQLite NORMAL in WAL mode,
        PostgreSQL ``synchronous_commit = off``)."""
        self.open()
        if self.postgres:
            if not durable:
                self.rows("SET LOCAL synchronous_commit TO OFF")
            return
        self.connection.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        # IMMEDIATE takes the write lock at once: a deferred transaction that reads and then
        # writes can fail with SQLITE_BUSY at once, without waiting out the busy timeout.
        self.connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def rows(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement (``?`` placeholders) and return its rows, if any."""
        if self.postgres:
            sql = sql.replace("?", "%s")
        cursor = self.connection.execute(sql, params)
        return list(cursor.fetchall()) if cursor.description else []

    def commit(self) -> None:
        if self.postgres:
            self.connection.commit()
        else:
            self.connection.execute("COMMIT")

    def rollback(self) -> None:
        """Roll back, and drop a PostgreSQL connection that broke (reopened next time)."""
        if self.connection is None:
            return
        try:
            if self.postgres:
                self.connection.rollback()
            elif self.connection.in_transaction:
                self.connection.execute("ROLLBACK")
        except Exception:
            self.close()
            return
        if self.postgres and self.connection.broken:
            self.close()

    def close(self) -> None:
        if self.connection is not None:
            try:
                self.connection.close()
            finally:
                self.connection = None
