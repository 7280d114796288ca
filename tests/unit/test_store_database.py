"""Database: migrations, schema-version refusal, durability settings, transactions, threads, timestamps."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kms.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, KmsError
from kms.store.database import (
    APPLICATION_ID,
    MIGRATIONS,
    Database,
    Migration,
    SchemaTooNew,
    Session,
    StorageFailure,
    parse_timestamp,
    timestamp_text,
)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "kms.db"


@pytest.fixture
def db(path: Path) -> Iterator[Database]:
    database = Database.open(path)
    yield database
    database.close()


def raw(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Query through a plain sqlite3 connection, independent of the code under test."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def tables(path: Path) -> set[str]:
    return {str(r[0]) for r in raw(path, "SELECT name FROM sqlite_schema WHERE type = 'table'")}


FIRST_RELEASE = MIGRATIONS[:1]
"""The schema of the first release: the migration tests add their own steps on top of it."""


def with_extra(*extra: Migration) -> tuple[Migration, ...]:
    return (*FIRST_RELEASE, *extra)


def test_new_database_has_the_latest_schema(db: Database, path: Path) -> None:
    assert db.schema_version == len(MIGRATIONS)
    assert {
        "keys",
        "key_versions",
        "releases",
        "product_floors",
        "signatures",
        "schema_migrations",
    } <= tables(path)
    assert raw(path, "PRAGMA application_id") == [(APPLICATION_ID,)]
    assert [r[0] for r in raw(path, "SELECT version FROM schema_migrations")] == list(
        range(1, len(MIGRATIONS) + 1)
    )


def test_reopening_applies_nothing_and_keeps_data(path: Path) -> None:
    with Database.open(path) as db, db.transaction() as session:
        session.execute("INSERT INTO product_floors VALUES ('p', 3)")
    for _ in range(3):
        with Database.open(path) as db:
            assert db.schema_version == len(MIGRATIONS)
    assert raw(path, "SELECT * FROM product_floors") == [("p", 3)]
    assert raw(path, "SELECT count(*) FROM schema_migrations") == [(len(MIGRATIONS),)]


def test_migrations_apply_in_order_each_once(path: Path) -> None:
    applied: list[int] = []

    def fill(session: Session) -> None:
        applied.append(3)
        session.execute("INSERT INTO notes (text) VALUES ('needs migration 2')")

    extra = (
        Migration(2, "notes", "CREATE TABLE notes (text TEXT NOT NULL) STRICT"),
        Migration(3, "first note", fill),
    )
    Database.open(path, migrations=FIRST_RELEASE).close()  # at version 1, as a first release would leave it
    with Database.open(path, migrations=with_extra(*extra)) as db:
        assert db.schema_version == 3
    with Database.open(path, migrations=with_extra(*extra)) as db:
        assert db.schema_version == 3
    assert applied == [3]
    assert raw(path, "SELECT text FROM notes") == [("needs migration 2",)]
    rows = raw(path, "SELECT version, description FROM schema_migrations ORDER BY version")
    assert [r[0] for r in rows] == [1, 2, 3]
    assert rows[2][1] == "first note"


def test_a_failed_migration_leaves_the_previous_version(path: Path) -> None:
    def broken(session: Session) -> None:
        session.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("migration bug")

    Database.open(path, migrations=FIRST_RELEASE).close()
    with pytest.raises(RuntimeError, match="migration bug"):
        Database.open(path, migrations=with_extra(Migration(2, "broken", broken)))
    assert raw(path, "PRAGMA user_version") == [(1,)]
    assert "half_done" not in tables(path)
    with Database.open(
        path, migrations=with_extra(Migration(2, "fixed", "CREATE TABLE done (x INTEGER)"))
    ) as db:
        assert db.schema_version == 2


def test_a_newer_schema_is_refused_and_left_alone(path: Path) -> None:
    future = with_extra(Migration(2, "from the future", "CREATE TABLE future (x INTEGER)"))
    Database.open(path, migrations=future).close()
    with pytest.raises(
        SchemaTooNew, match="schema version 2, but this release of the service knows versions up to 1"
    ):
        Database.open(path, migrations=FIRST_RELEASE)
    assert raw(path, "PRAGMA user_version") == [(2,)]
    assert issubclass(SchemaTooNew, FailedPrecondition)


def test_a_file_of_another_application_is_refused(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE something_else (x INTEGER)")
    conn.close()
    with pytest.raises(FailedPrecondition, match="not a key management service database"):
        Database.open(path)
    assert "keys" not in tables(path)


def test_migrations_must_be_numbered_in_order(path: Path) -> None:
    with pytest.raises(ValueError, match="numbered"):
        Database.open(path, migrations=with_extra(Migration(3, "gap", "SELECT 1")))


def test_concurrent_opens_migrate_once(path: Path) -> None:
    barrier = threading.Barrier(6)

    def open_close() -> None:
        barrier.wait()
        Database.open(path).close()

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(open_close) for _ in range(6)]
    for future in futures:
        future.result()
    assert raw(path, "SELECT count(*) FROM schema_migrations") == [(len(MIGRATIONS),)]


def pragmas(session: Session) -> dict[str, object]:
    names = ("journal_mode", "synchronous", "foreign_keys", "busy_timeout", "query_only", "trusted_schema")
    values: dict[str, object] = {}
    for name in names:
        row = session.row(f"PRAGMA {name}")
        assert row is not None
        values[name] = (
            row.text(name)
            if name == "journal_mode"
            else row.integer("timeout" if name == "busy_timeout" else name)
        )
    return values


def test_durability_settings_are_in_effect_on_every_connection(path: Path) -> None:
    with Database.open(path, busy_timeout=2.5) as db:
        expected = {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1, "busy_timeout": 2500}
        with db.transaction() as session:
            assert pragmas(session) == {**expected, "query_only": 0, "trusted_schema": 0}
        with db.snapshot() as session:
            assert pragmas(session) == {**expected, "query_only": 1, "trusted_schema": 0}
        assert path.with_name("kms.db-wal").exists()
    assert raw(path, "PRAGMA journal_mode") == [("wal",)]  # persistent in the file


def test_foreign_keys_are_enforced(db: Database) -> None:
    with pytest.raises(InvalidArgument) as caught, db.transaction() as session:
        session.execute(
            "INSERT INTO key_versions (key_id, version, algorithm, state, hsm_id, public_key_der, "
            "created_at) VALUES ('no-such-key', 1, 'ecdsa-p256', 'enabled', x'01', x'02', 'now')"
        )
    assert "INSERT" not in str(caught.value)


def test_transaction_commits_only_on_a_clean_exit(db: Database, path: Path) -> None:
    with pytest.raises(KeyError), db.transaction() as session:
        session.execute("INSERT INTO product_floors VALUES ('rolled-back', 1)")
        raise KeyError("boom")
    with db.transaction() as session:
        session.execute("INSERT INTO product_floors VALUES ('committed', 2)")
    assert raw(path, "SELECT product FROM product_floors") == [("committed",)]


def test_sqlite_errors_become_domain_errors_without_sql(db: Database) -> None:
    with db.transaction() as session:
        session.execute("INSERT INTO product_floors VALUES ('p', 1)")
    with pytest.raises(AlreadyExists) as caught, db.transaction() as session:
        session.execute("INSERT INTO product_floors VALUES ('p', 2)")
    assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)
    assert "product_floors" not in str(caught.value)
    with pytest.raises(InvalidArgument), db.transaction() as session:
        session.execute("INSERT INTO product_floors VALUES ('q', -1)")
    with pytest.raises(StorageFailure), db.snapshot() as session:
        session.rows("SELECT * FROM no_such_table")


def test_readers_cannot_write(db: Database) -> None:
    with pytest.raises(KmsError), db.snapshot() as session:
        session.execute("INSERT INTO product_floors VALUES ('p', 1)")


def test_nested_transactions_are_refused_not_deadlocked(db: Database) -> None:
    with db.transaction(), pytest.raises(RuntimeError, match="already open"), db.transaction():
        pass


def test_a_snapshot_sees_one_state_while_the_writer_commits(db: Database) -> None:
    with db.snapshot() as reading:
        assert reading.rows("SELECT * FROM product_floors") == []
        with db.transaction() as writing:  # not blocked by the open reader
            writing.execute("INSERT INTO product_floors VALUES ('p', 1)")
        assert reading.rows("SELECT * FROM product_floors") == []
    with db.snapshot() as reading:
        assert len(reading.rows("SELECT * FROM product_floors")) == 1


def test_the_reader_pool_is_bounded(path: Path) -> None:
    with Database.open(path, max_readers=1, busy_timeout=0.2) as db, db.snapshot():
        failures: list[BaseException] = []

        def read() -> None:
            try:
                with db.snapshot():
                    pass
            except StorageFailure as e:
                failures.append(e)

        thread = threading.Thread(target=read)
        thread.start()
        thread.join()
        assert len(failures) == 1
        assert "too many concurrent reads" in str(failures[0])


def test_a_closed_database_raises_storage_failure(path: Path) -> None:
    db = Database.open(path)
    db.close()
    db.close()
    with pytest.raises(StorageFailure, match="closed"), db.transaction():
        pass
    with pytest.raises(StorageFailure, match="closed"), db.snapshot():
        pass


aware_datetimes = st.datetimes(
    min_value=datetime(1000, 1, 1),
    max_value=datetime(9998, 12, 31),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]),
)


@given(aware_datetimes)
def test_timestamps_round_trip_exactly_in_utc(moment: datetime) -> None:
    text = timestamp_text(moment)
    assert len(text) == len("2024-01-01T00:00:00.000000Z") and text.endswith("Z")
    back = parse_timestamp(text)
    assert back == moment and back.tzinfo is UTC and back.microsecond == moment.microsecond


@given(aware_datetimes, aware_datetimes)
def test_timestamp_text_sorts_chronologically(a: datetime, b: datetime) -> None:
    assert (timestamp_text(a) < timestamp_text(b)) == (a < b)


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="time zone"):
        timestamp_text(datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="time zone"):
        parse_timestamp("2024-01-01T00:00:00.000000")


def test_an_unopenable_path_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(StorageFailure, match=r"cannot open the database .*missing/kms\.db"):
        Database.open(tmp_path / "missing" / "kms.db")
