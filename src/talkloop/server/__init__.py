"""The platform server: OpenAI-compatible API, tenants, keys, metering (FastAPI).

`create_app(Settings(...))` builds the app; `talkloop serve` runs it under uvicorn.
"""

from talkloop.server.app import create_app
from talkloop.server.settings import Settings

__all__ = ["Settings", "create_app"]
