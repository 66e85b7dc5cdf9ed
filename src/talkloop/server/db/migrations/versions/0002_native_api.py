"""Native API tables: character owners and avatars, world books and their attachment to
characters, personas (and the persona a conversation uses), group rooms and their event log,
and feedback events (ratings, swipe choices, edits).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "character_avatars",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("media_type", sa.String(length=64), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["id"],
            ["characters.id"],
            name=op.f("fk_character_avatars_id_characters"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_character_avatars_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_character_avatars")),
    )
    op.create_index(
        op.f("ix_character_avatars_tenant_id"), "character_avatars", ["tenant_id"], unique=False
    )

    op.create_table(
        "character_owners",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("end_user_id", sa.String(length=40), nullable=False),
        sa.ForeignKeyConstraint(
            ["end_user_id"],
            ["end_users.id"],
            name=op.f("fk_character_owners_end_user_id_end_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["id"],
            ["characters.id"],
            name=op.f("fk_character_owners_id_characters"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_character_owners_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_character_owners")),
    )
    op.create_index(
        op.f("ix_character_owners_end_user_id"), "character_owners", ["end_user_id"], unique=False
    )
    op.create_index(
        op.f("ix_character_owners_tenant_id"), "character_owners", ["tenant_id"], unique=False
    )

    op.create_table(
        "personas",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("end_user_id", sa.String(length=40), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["end_user_id"],
            ["end_users.id"],
            name=op.f("fk_personas_end_user_id_end_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_personas_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_personas")),
    )
    op.create_index(op.f("ix_personas_end_user_id"), "personas", ["end_user_id"], unique=False)
    op.create_index(op.f("ix_personas_tenant_id"), "personas", ["tenant_id"], unique=False)

    op.create_table(
        "world_books",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("end_user_id", sa.String(length=40), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("book", JSON_TYPE, nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["end_user_id"],
            ["end_users.id"],
            name=op.f("fk_world_books_end_user_id_end_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_world_books_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_world_books")),
    )
    op.create_index(
        op.f("ix_world_books_end_user_id"), "world_books", ["end_user_id"], unique=False
    )
    op.create_index(op.f("ix_world_books_tenant_id"), "world_books", ["tenant_id"], unique=False)

    op.create_table(
        "character_world_books",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("character_id", sa.String(length=40), nullable=False),
        sa.Column("world_book_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["character_id"],
            ["characters.id"],
            name=op.f("fk_character_world_books_character_id_characters"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_character_world_books_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["world_book_id"],
            ["world_books.id"],
            name=op.f("fk_character_world_books_world_book_id_world_books"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_character_world_books")),
        sa.UniqueConstraint(
            "character_id",
            "world_book_id",
            name=op.f("uq_character_world_books_character_id_world_book_id"),
        ),
    )
    op.create_index(
        op.f("ix_character_world_books_character_id"),
        "character_world_books",
        ["character_id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_character_world_books_tenant_id"),
        "character_world_books",
        ["tenant_id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_character_world_books_world_book_id"),
        "character_world_books",
        ["world_book_id"],
        unique=False,
    )

    op.create_table(
        "conversation_personas",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("persona_id", sa.String(length=40), nullable=True),
        sa.ForeignKeyConstraint(
            ["id"],
            ["conversations.id"],
            name=op.f("fk_conversation_personas_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["persona_id"],
            ["personas.id"],
            name=op.f("fk_conversation_personas_persona_id_personas"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_conversation_personas_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversation_personas")),
    )
    op.create_index(
        op.f("ix_conversation_personas_persona_id"),
        "conversation_personas",
        ["persona_id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_conversation_personas_tenant_id"),
        "conversation_personas",
        ["tenant_id"],
        unique=False,
    )

    op.create_table(
        "rooms",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("end_user_id", sa.String(length=40), nullable=True),
        sa.Column("conversation_id", sa.String(length=40), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("strategy", sa.String(length=32), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_rooms_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["end_user_id"],
            ["end_users.id"],
            name=op.f("fk_rooms_end_user_id_end_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_rooms_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rooms")),
    )
    op.create_index(op.f("ix_rooms_conversation_id"), "rooms", ["conversation_id"], unique=False)
    op.create_index(op.f("ix_rooms_end_user_id"), "rooms", ["end_user_id"], unique=False)
    op.create_index(op.f("ix_rooms_tenant_id"), "rooms", ["tenant_id"], unique=False)

    op.create_table(
        "feedback_events",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("conversation_id", sa.String(length=40), nullable=False),
        sa.Column("message_id", sa.String(length=40), nullable=False),
        sa.Column("end_user_id", sa.String(length=40), nullable=True),
        sa.Column("character_id", sa.String(length=40), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("stars", sa.Integer(), nullable=True),
        sa.Column("thumbs", sa.Integer(), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("tags", JSON_TYPE, nullable=False),
        sa.Column("swipe_index", sa.Integer(), nullable=True),
        sa.Column("previous_swipe_index", sa.Integer(), nullable=True),
        sa.Column("original_text", sa.Text(), nullable=True),
        sa.Column("edited_text", sa.Text(), nullable=True),
        sa.Column("editor", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_feedback_events_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["end_user_id"],
            ["end_users.id"],
            name=op.f("fk_feedback_events_end_user_id_end_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_feedback_events_message_id_messages"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_feedback_events_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback_events")),
    )
    op.create_index(
        op.f("ix_feedback_events_conversation_id"),
        "feedback_events",
        ["conversation_id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_feedback_events_end_user_id"), "feedback_events", ["end_user_id"], unique=False
    )
    op.create_index(
        op.f("ix_feedback_events_message_id"), "feedback_events", ["message_id"], unique=False
    )
    op.create_index(
        op.f("ix_feedback_events_tenant_id"), "feedback_events", ["tenant_id"], unique=False
    )

    op.create_table(
        "room_events",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("room_id", sa.String(length=40), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("character_id", sa.String(length=40), nullable=True),
        sa.Column("message_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_room_events_message_id_messages"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["room_id"], ["rooms.id"], name=op.f("fk_room_events_room_id_rooms"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_room_events_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_room_events")),
        sa.UniqueConstraint("room_id", "position", name=op.f("uq_room_events_room_id_position")),
    )
    op.create_index(op.f("ix_room_events_message_id"), "room_events", ["message_id"], unique=False)
    op.create_index(op.f("ix_room_events_room_id"), "room_events", ["room_id"], unique=False)
    op.create_index(op.f("ix_room_events_tenant_id"), "room_events", ["tenant_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_room_events_tenant_id"), table_name="room_events")
    op.drop_index(op.f("ix_room_events_room_id"), table_name="room_events")
    op.drop_index(op.f("ix_room_events_message_id"), table_name="room_events")

    op.drop_table("room_events")
    op.drop_index(op.f("ix_feedback_events_tenant_id"), table_name="feedback_events")
    op.drop_index(op.f("ix_feedback_events_message_id"), table_name="feedback_events")
    op.drop_index(op.f("ix_feedback_events_end_user_id"), table_name="feedback_events")
    op.drop_index(op.f("ix_feedback_events_conversation_id"), table_name="feedback_events")

    op.drop_table("feedback_events")
    op.drop_index(op.f("ix_rooms_tenant_id"), table_name="rooms")
    op.drop_index(op.f("ix_rooms_end_user_id"), table_name="rooms")
    op.drop_index(op.f("ix_rooms_conversation_id"), table_name="rooms")

    op.drop_table("rooms")
    op.drop_index(op.f("ix_conversation_personas_tenant_id"), table_name="conversation_personas")
    op.drop_index(op.f("ix_conversation_personas_persona_id"), table_name="conversation_personas")

    op.drop_table("conversation_personas")
    op.drop_index(
        op.f("ix_character_world_books_world_book_id"), table_name="character_world_books"
    )
    op.drop_index(op.f("ix_character_world_books_tenant_id"), table_name="character_world_books")
    op.drop_index(op.f("ix_character_world_books_character_id"), table_name="character_world_books")

    op.drop_table("character_world_books")
    op.drop_index(op.f("ix_world_books_tenant_id"), table_name="world_books")
    op.drop_index(op.f("ix_world_books_end_user_id"), table_name="world_books")

    op.drop_table("world_books")
    op.drop_index(op.f("ix_personas_tenant_id"), table_name="personas")
    op.drop_index(op.f("ix_personas_end_user_id"), table_name="personas")

    op.drop_table("personas")
    op.drop_index(op.f("ix_character_owners_tenant_id"), table_name="character_owners")
    op.drop_index(op.f("ix_character_owners_end_user_id"), table_name="character_owners")

    op.drop_table("character_owners")
    op.drop_index(op.f("ix_character_avatars_tenant_id"), table_name="character_avatars")

    op.drop_table("character_avatars")
