"""The packaged migrations build exactly the models' schema, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from talkloop.server.db.base import Base
from talkloop.server.db.database import Database
from talkloop.server.db.migrate import (
    alembic_config,
    current_revision,
    import_table_modules,
    upgrade,
)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


TABLES_0001 = {
    "alembic_version",
    "tenants",
    "api_keys",
    "end_users",
    "characters",
    "conversations",
    "messages",
    "feedback",
    "usage_ledger",
    "prices",
}


def test_upgrade_creates_every_table_at_head(db: Database) -> None:
    assert set(inspect(db.engine).get_table_names()) >= TABLES_0001
    assert current_revision(db.engine) == head_revision()


def test_migrated_schema_matches_the_models(db: Database) -> None:
    import_table_modules()
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_upgrade_again_is_a_no_op(db: Database) -> None:
    upgrade(db.engine)
    upgrade(db.engine)
    assert current_revision(db.engine) == head_revision()


def test_downgrade_to_base_and_back(db: Database) -> None:
    with db.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
    assert set(inspect(db.engine).get_table_names()) == {"alembic_version"}
    upgrade(db.engine)
    assert set(inspect(db.engine).get_table_names()) >= TABLES_0001


def test_sqlite_runs_in_wal_mode_with_foreign_keys(db: Database) -> None:
    if db.dialect != "sqlite":
        pytest.skip("SQLite only")
    with db.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
