"""Tenant isolation in the data-access layer: tenant B never sees a row of tenant A.

The matrix walks every tenant-scoped table (`TENANT_SCOPED_MODELS`), so a new noun is
covered as soon as it is registered there; the named repositories are checked one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from talkloop.characters.bundled import load_bundled_character
from talkloop.server.db.base import Base
from talkloop.server.db.database import Database
from talkloop.server.db.models import TENANT_SCOPED_MODELS, Feedback, MessageStatus
from talkloop.server.errors import NotFoundError
from talkloop.server.store import PlatformStore, Scoped, TenantStore

SERVER_SRC = Path(__file__).resolve().parents[3] / "src" / "talkloop" / "server"


@dataclass
class TenantARows:
    tenant_a: str
    tenant_b: str
    rows: dict[str, Base]


@pytest.fixture
def seeded(db: Database) -> TenantARows:
    """Tenant A with one row of every scoped table; tenant B empty."""
    with db.session() as session:
        platform = PlatformStore(session)
        a, b = platform.create_tenant("a").id, platform.create_tenant("b").id
        store = TenantStore(session, a)
        key = store.keys.create("k").row
        user = store.end_users.ensure("alice")
        character = store.characters.create("hush", load_bundled_character("hush"))
        conversation = store.conversations.create(end_user_id=user.id, character_id=character.id)
        message = store.conversations.add_message(conversation, "user", "hi")
        feedback = Feedback(message_id=message.id, end_user_id=user.id, rating=1)
        Scoped(session, a)._add(feedback)
        rows: dict[str, Base] = {
            "ApiKey": key,
            "EndUser": user,
            "Character": character,
            "Conversation": conversation,
            "Message": message,
            "Feedback": feedback,
        }
    return TenantARows(a, b, rows)


def test_every_scoped_table_hides_tenant_a_rows_from_b(db: Database, seeded: TenantARows) -> None:
    assert {model.__name__ for model in TENANT_SCOPED_MODELS} == set(seeded.rows)
    with db.session() as session:
        for model in TENANT_SCOPED_MODELS:
            row_id = seeded.rows[model.__name__].id  # type: ignore[attr-defined]
            assert Scoped(session, seeded.tenant_b)._find(model, row_id) is None, model
            assert Scoped(session, seeded.tenant_a)._find(model, row_id) is not None, model
            with pytest.raises(NotFoundError):
                Scoped(session, seeded.tenant_b)._get(model, row_id, model.__name__)


def test_repositories_of_b_report_a_rows_as_not_found(db: Database, seeded: TenantARows) -> None:
    rows = seeded.rows
    with db.session() as session:
        store_b = TenantStore(session, seeded.tenant_b)
        for get, row_id in [
            (store_b.keys.get, rows["ApiKey"].id),  # type: ignore[attr-defined]
            (store_b.keys.revoke, rows["ApiKey"].id),  # type: ignore[attr-defined]
            (store_b.end_users.get, rows["EndUser"].id),  # type: ignore[attr-defined]
            (store_b.characters.get, rows["Character"].id),  # type: ignore[attr-defined]
            (store_b.conversations.get, rows["Conversation"].id),  # type: ignore[attr-defined]
            (store_b.conversations.get_message, rows["Message"].id),  # type: ignore[attr-defined]
        ]:
            with pytest.raises(NotFoundError):
                get(row_id)
        assert store_b.characters.resolve("hush") is None
        assert store_b.characters.resolve(rows["Character"].id) is None  # type: ignore[attr-defined]
        assert store_b.end_users.find("alice") is None
        assert list(store_b.keys.all()) == []
        assert list(store_b.characters.all()) == []
        assert list(store_b.conversations.all()) == []
        assert list(store_b.conversations.messages(rows["Conversation"].id)) == []  # type: ignore[attr-defined]
    with db.session() as session:  # nothing of A changed (the revoke above was refused)
        key = TenantStore(session, seeded.tenant_a).keys.get(rows["ApiKey"].id)  # type: ignore[attr-defined]
        assert key.revoked_at is None


def test_an_end_user_sees_only_their_own_conversations(db: Database, seeded: TenantARows) -> None:
    conversation_id = seeded.rows["Conversation"].id  # type: ignore[attr-defined]
    with db.session() as session:
        store = TenantStore(session, seeded.tenant_a)
        bob = store.end_users.ensure("bob")
        with pytest.raises(NotFoundError):
            store.conversations.get(conversation_id, end_user_id=bob.id)
        assert store.conversations.all(end_user_id=bob.id) == []
        alice = store.end_users.ensure("alice")
        assert store.conversations.get(conversation_id, end_user_id=alice.id).id == conversation_id


def test_a_message_cannot_hang_under_another_tenants_message(
    db: Database, seeded: TenantARows
) -> None:
    with db.session() as session:
        store_b = TenantStore(session, seeded.tenant_b)
        conversation = store_b.conversations.create()
        with pytest.raises(NotFoundError):
            store_b.conversations.add_message(
                conversation,
                "user",
                "x",
                parent_id=seeded.rows["Message"].id,  # type: ignore[attr-defined]
            )


def test_conversation_branch_follows_parents_to_the_active_leaf(db: Database) -> None:
    with db.session() as session:
        tenant = PlatformStore(session).create_tenant("t").id
        repo = TenantStore(session, tenant).conversations
        conversation = repo.create()
        first = repo.add_message(conversation, "user", "one")
        reply = repo.add_message(conversation, "assistant", "two", status=MessageStatus.STREAMING)
        repo.add_message(conversation, "assistant", "other branch", parent_id=first.id)
        assert [m.content for m in repo.branch(conversation)] == ["one", "other branch"]
        repo.set_message_text(reply, "two, done", MessageStatus.COMPLETE)
        assert [m.content for m in repo.branch(conversation, reply.id)] == ["one", "two, done"]
        assert reply.swipes == ["two, done"] and reply.status == "complete"


def _is_route_module(path: Path) -> bool:
    relative = path.relative_to(SERVER_SRC)
    return relative.parts[0].endswith("_api") or "APIRouter(" in path.read_text()


def test_route_modules_build_no_queries() -> None:
    """Routes reach rows through the data-access layer (a TenantStore); never by hand."""
    offenders = [
        str(path.relative_to(SERVER_SRC))
        for path in SERVER_SRC.rglob("*.py")
        if _is_route_module(path)
        and ("select(" in path.read_text() or "session.query(" in path.read_text())
    ]
    assert offenders == []
