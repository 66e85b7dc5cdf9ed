"""Admin API (`/admin`): tenants and their API keys; needs an admin key."""

from talkloop.server.admin_api.routes import router

__all__ = ["router"]
