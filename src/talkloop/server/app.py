"""`create_app`: the FastAPI application, its lifespan, middleware, routers and error mapping.

The lifespan migrates the database, bootstraps the first start, builds the engine backend
when none is given, and on shutdown flushes the usage ledger and closes what it opened.
To add a router: write it in its own module and include it in `ROUTERS` (or `app.include_router`
on the returned app); reach services through `deps`, data through `auth.StoreDep`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from talkloop.backends.base import ModelBackend
from talkloop.backends.engine_backend import AdmissionLimits, EngineBackend
from talkloop.backends.remote import RemoteBackend, RemoteConfig, parse_replica_urls
from talkloop.engine.config import (
    CacheConfig,
    EngineConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from talkloop.engine.engine_process import engine_cpus
from talkloop.server import admin_api, health, metrics, openai_api, usage_api
from talkloop.server.auth import KeyCache
from talkloop.server.bootstrap import bootstrap
from talkloop.server.db.database import Database
from talkloop.server.db.migrate import upgrade
from talkloop.server.errors import install_error_handlers
from talkloop.server.ledger import UsageLedger
from talkloop.server.limits.headers import RateLimitHeadersMiddleware
from talkloop.server.logs import configure_logging
from talkloop.server.metering.hooks import build_metering
from talkloop.server.metrics import HttpMetricsMiddleware, ServingMetrics
from talkloop.server.middleware import DrainGate, DrainMiddleware, RequestIdMiddleware
from talkloop.server.model_registry import ModelRegistry
from talkloop.server.native_api import router as native_api_router
from talkloop.server.services import Services
from talkloop.server.settings import Settings

logger = logging.getLogger(__name__)

ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    admin_api.router,
    openai_api.router,
    metrics.router,
    usage_api.router,
    native_api_router,
)
AdminKeyCallback = Callable[[str], None]


def build_remote_backend(settings: Settings) -> RemoteBackend:
    """The remote replicas at `settings.backend_urls`, serving `settings.backend_model`."""
    if not settings.backend_model:
        raise ValueError("backend_urls is set, so backend_model must name the remote model")
    key = settings.backend_api_key
    config = RemoteConfig(
        urls=parse_replica_urls(settings.backend_urls or ""),
        model=settings.backend_model,
        served_model_name=settings.served_model_name,
        api_key=key.get_secret_value() if key else None,
    )
    return RemoteBackend(config)


def engine_config(settings: Settings) -> EngineConfig:
    """The built-in engine's configuration from the server's settings."""
    kv_bytes = settings.kv_cache_mb << 20 if settings.kv_cache_mb else None
    return EngineConfig(
        model=settings.model,
        dtype=settings.dtype,
        num_threads=settings.num_threads,
        max_model_len=settings.max_model_len,
        quantization=settings.quantization,
        cache=CacheConfig(kv_cache_bytes=kv_bytes),
        scheduler=SchedulerConfig(
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
        ),
        speculative=SpeculativeConfig(
            method=settings.speculative, draft_model=settings.draft_model
        ),
    )


def engine_in_a_process(settings: Settings) -> bool:
    """`settings.engine_process`, or when unset: whether the engine leaves one of the CPUs this
    process may use free (its affinity: a container's cpuset or `taskset` count, not the host)."""
    if settings.engine_process is not None:
        return settings.engine_process
    return engine_cpus(settings.num_threads) is not None  # the CPUs it would be pinned to


def build_backend(settings: Settings) -> ModelBackend:
    """Remote replicas when `backend_urls` is set, else the built-in engine on `settings.model`
    (None: the bundled model)."""
    if settings.backend_urls:
        return build_remote_backend(settings)
    limits = AdmissionLimits(settings.max_queued_requests, settings.max_queued_prompt_tokens)
    return EngineBackend.from_config(
        engine_config(settings),
        settings.served_model_name,
        limits,
        process=engine_in_a_process(settings),
        process_setup=functools.partial(configure_logging, settings.log_level, settings.log_format),
    )


def _announce_admin_key(secret: str, callback: AdminKeyCallback | None) -> None:
    if callback is not None:
        callback(secret)
    else:
        logger.warning(
            "first start: admin API key (store it now, it is not shown again): %s", secret
        )


def create_app(
    settings: Settings,
    backend: ModelBackend | None = None,
    *,
    extra_backends: Sequence[ModelBackend] = (),
    on_admin_key: AdminKeyCallback | None = None,
) -> FastAPI:
    """The app for `settings`. A given `backend` is used as is and not closed at shutdown."""
    gate = DrainGate()
    serving_metrics = ServingMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.db_url)
        await asyncio.to_thread(upgrade, db.engine)
        result = await asyncio.to_thread(bootstrap, db, settings)
        if result.created_admin_key is not None:
            _announce_admin_key(result.created_admin_key, on_admin_key)
        default = backend
        owned: tuple[ModelBackend, ...] = ()
        if default is None:
            default = await asyncio.to_thread(build_backend, settings)
            owned = (default,)
        models = ModelRegistry([default, *extra_backends])
        metering = build_metering(settings, db, models, serving_metrics)
        serving_metrics.track_backends(lambda: models.backends)
        ledger = UsageLedger(db, settings.ledger_flush_interval_s, metering)
        key_cache = KeyCache.for_database(db)
        app.state.services = Services(settings, db, models, ledger, gate, owned, key_cache)
        try:
            yield
        finally:
            gate.start_draining()
            await gate.wait_idle(settings.drain_timeout_s)
            app.state.services = None
            await asyncio.to_thread(ledger.close)
            metering.close()
            for own in owned:
                await own.close()
            if key_cache is not None:
                key_cache.close()
            db.dispose()

    app = FastAPI(title="talkloop", version="0.1.0", lifespan=lifespan)
    app.state.services = None
    app.state.drain_gate = gate
    app.state.metrics = serving_metrics
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(RateLimitHeadersMiddleware)
    app.add_middleware(DrainMiddleware, gate=gate)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(HttpMetricsMiddleware, metrics=serving_metrics)
    return app
