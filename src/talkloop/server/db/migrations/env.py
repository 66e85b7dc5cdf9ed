"""Alembic environment: migrate the connection `talkloop.server.db.migrate` hands in.

Run through `alembic.command` with `alembic_config(url=...)` to autogenerate a revision.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from talkloop.server.db.base import Base
from talkloop.server.db.migrate import import_table_modules

import_table_modules()  # every table, wherever it is declared


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTER via table copy
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(context.config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as own_connection:
        _run(own_connection)


run_migrations_online()
