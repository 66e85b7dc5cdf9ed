"""`/api/usage` (a tenant's usage summaries, quota status and CSV export) and the admin routes
for prices, quotas and rate limits (`/api/admin/...`)."""

from fastapi import APIRouter

from talkloop.server.errors import ERROR_RESPONSES
from talkloop.server.usage_api import admin, usage

router = APIRouter(prefix="/api", responses=ERROR_RESPONSES)
router.include_router(usage.router)
router.include_router(admin.router)

__all__ = ["router"]
