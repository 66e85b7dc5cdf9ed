"""`talkloop serve`: run the app under uvicorn; SIGTERM drains before the process exits.

On SIGTERM (or Ctrl-C) new requests get a fast 503 while in-flight ones (streams included)
finish within `drain_timeout_s`; then the lifespan flushes the usage ledger and closes.
"""

from __future__ import annotations

from types import FrameType

import uvicorn

from talkloop.server.app import AdminKeyCallback, create_app
from talkloop.server.middleware import DrainGate
from talkloop.server.settings import Settings


class DrainingServer(uvicorn.Server):
    """A uvicorn server that closes the drain gate as soon as a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, gate: DrainGate) -> None:
        super().__init__(config)
        self.gate = gate

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.gate.start_draining()
        super().handle_exit(sig, frame)


def serve(settings: Settings, on_admin_key: AdminKeyCallback | None = None) -> None:
    app = create_app(settings, on_admin_key=on_admin_key)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
        log_config=None,
        access_log=False,
    )
    DrainingServer(config, app.state.drain_gate).run()
