"""Run the Alembic migrations shipped in this package: create or upgrade the schema at start.

The same scripts serve SQLite and PostgreSQL. On PostgreSQL an advisory lock makes replicas
that start together migrate one at a time.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, text

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
PG_MIGRATION_LOCK = 0x74616C6B  # "talk": arbitrary, fixed advisory lock id


TABLE_PACKAGES = ("talkloop.server.db", "talkloop.server.store")


def import_table_modules() -> None:
    """Import every module that may declare tables, so `Base.metadata` holds them all."""
    for package_name in TABLE_PACKAGES:
        package = importlib.import_module(package_name)
        for module in pkgutil.iter_modules(package.__path__, f"{package_name}."):
            if module.name != f"{package_name}.migrations":
                importlib.import_module(module.name)


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """Config for the packaged scripts; use it with `alembic.command` (e.g. `revision`)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` (creating it on an empty database)."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": PG_MIGRATION_LOCK})
        command.upgrade(alembic_config(connection), revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
