"""Persistence: typed models, the `Database` (engine + sessions) and packaged migrations."""

from talkloop.server.db.base import Base
from talkloop.server.db.database import Database
from talkloop.server.db.migrate import upgrade

__all__ = ["Base", "Database", "upgrade"]
