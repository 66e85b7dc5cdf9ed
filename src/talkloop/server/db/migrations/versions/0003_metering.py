"""Metering: per-row cost on the usage ledger; quotas, their counters and reservations;
per-key rate limits.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _tenant_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["tenant_id"],
        ["tenants.id"],
        name=op.f(f"fk_{table}_tenant_id_tenants"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.add_column(
        "usage_ledger",
        sa.Column("cost_micros", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_table(
        "quotas",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("max_tokens", sa.BigInteger(), nullable=True),
        sa.Column("max_cost_micros", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        _tenant_fk("quotas"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quotas")),
        sa.UniqueConstraint(
            "tenant_id", "api_key_id", "period", name=op.f("uq_quotas_tenant_id_api_key_id_period")
        ),
    )
    op.create_index(op.f("ix_quotas_tenant_id"), "quotas", ["tenant_id"], unique=False)
    op.create_table(
        "rate_limits",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("requests_per_minute", sa.Integer(), nullable=True),
        sa.Column("tokens_per_minute", sa.Integer(), nullable=True),
        _tenant_fk("rate_limits"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rate_limits")),
        sa.UniqueConstraint(
            "tenant_id", "api_key_id", name=op.f("uq_rate_limits_tenant_id_api_key_id")
        ),
    )
    op.create_index(op.f("ix_rate_limits_tenant_id"), "rate_limits", ["tenant_id"], unique=False)
    op.create_table(
        "quota_counters",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("quota_id", sa.String(length=40), nullable=False),
        sa.Column("period_start", sa.DateTime(), nullable=False),
        sa.Column("used_tokens", sa.BigInteger(), nullable=False),
        sa.Column("used_micros", sa.BigInteger(), nullable=False),
        sa.Column("reserved_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reserved_micros", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["quota_id"],
            ["quotas.id"],
            name=op.f("fk_quota_counters_quota_id_quotas"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quota_counters")),
        sa.UniqueConstraint(
            "quota_id", "period_start", name=op.f("uq_quota_counters_quota_id_period_start")
        ),
    )
    op.create_index(
        op.f("ix_quota_counters_quota_id"), "quota_counters", ["quota_id"], unique=False
    )
    op.create_table(
        "quota_reservations",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("counter_id", BIG_ID, nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("micros", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["counter_id"],
            ["quota_counters.id"],
            name=op.f("fk_quota_reservations_counter_id_quota_counters"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("request_id", "counter_id", name=op.f("pk_quota_reservations")),
    )


def downgrade() -> None:
    op.drop_table("quota_reservations")
    op.drop_index(op.f("ix_quota_counters_quota_id"), table_name="quota_counters")
    op.drop_table("quota_counters")
    op.drop_index(op.f("ix_rate_limits_tenant_id"), table_name="rate_limits")
    op.drop_table("rate_limits")
    op.drop_index(op.f("ix_quotas_tenant_id"), table_name="quotas")
    op.drop_table("quotas")
    with op.batch_alter_table("usage_ledger") as batch:
        batch.drop_column("cost_micros")
