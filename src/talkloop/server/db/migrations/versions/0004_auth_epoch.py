"""Auth epoch: one counter that triggers bump on every change to API keys and tenants, so a
server may cache who a key authenticates and still see a revocation on its next request.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

WATCHED = ("api_keys", "tenants")
EVENTS = ("INSERT", "UPDATE", "DELETE")
BUMP = "UPDATE auth_epoch SET value = value + 1"


def upgrade() -> None:
    op.create_table(
        "auth_epoch",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_epoch")),
    )
    op.execute("INSERT INTO auth_epoch (id, value) VALUES (1, 0)")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION talkloop_bump_auth_epoch() RETURNS trigger AS $$ "
            f"BEGIN {BUMP}; RETURN NULL; END $$ LANGUAGE plpgsql"
        )
        for table in WATCHED:
            op.execute(
                f"CREATE TRIGGER {table}_bump_auth_epoch AFTER INSERT OR UPDATE OR DELETE "
                f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION talkloop_bump_auth_epoch()"
            )
        return
    for table in WATCHED:  # SQLite: one trigger per event, per row
        for event in EVENTS:
            op.execute(
                f"CREATE TRIGGER {table}_{event.lower()}_bump_auth_epoch AFTER {event} "
                f"ON {table} BEGIN {BUMP}; END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in WATCHED:
            op.execute(f"DROP TRIGGER {table}_bump_auth_epoch ON {table}")
        op.execute("DROP FUNCTION talkloop_bump_auth_epoch()")
    else:
        for table in WATCHED:
            for event in EVENTS:
                op.execute(f"DROP TRIGGER {table}_{event.lower()}_bump_auth_epoch")
    op.drop_table("auth_epoch")
