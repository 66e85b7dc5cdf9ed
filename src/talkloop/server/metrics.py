"""Prometheus metrics for `/metrics`, in one registry per app (never the global default).

Serving metrics carry vLLM's exact names (and `model_name` label) so its dashboards work:
latency histograms and token counters are observed per request through the ledger's meter
hooks; gauges (running, waiting, KV cache usage) are read from `ModelBackend.stats()` at
scrape time. HTTP metrics count requests by route template and status. Not a tracing system.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from talkloop.backends.base import ModelBackend
from talkloop.server.db.models import UsageStatus
from talkloop.server.ledger import UsageEntry

MODEL_LABEL = "model_name"
# vLLM's buckets, so histograms line up with vLLM's own dashboards.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
# (vLLM uses its request-latency buckets for end-to-end and queue time alike.)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
# `ModelBackend.stats()` key -> gauge names (kv_cache_usage_perc also under its older name).
STAT_GAUGES: dict[str, tuple[str, ...]] = {
    "num_requests_running": ("vllm:num_requests_running",),
    "num_requests_waiting": ("vllm:num_requests_waiting",),
    "kv_cache_usage_perc": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
}
# `ModelBackend.stats()` key -> counter name (running totals; exposed with a `_total` suffix).
STAT_COUNTERS: dict[str, str] = {
    "spec_decode_num_draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "spec_decode_num_accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
}
UNMATCHED_ROUTE = "<unmatched>"

BackendsFn = Callable[[], Sequence[ModelBackend]]


class BackendStatsCollector:
    """Gauges from each backend's `stats()`; unknown keys as `talkloop:<key>`."""

    def __init__(self) -> None:
        self.backends: BackendsFn = lambda: ()

    def collect(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for backend in self.backends():
            for key, value in backend.stats().items():
                counter = STAT_COUNTERS.get(key)
                names = (counter,) if counter else STAT_GAUGES.get(key, (f"talkloop:{key}",))
                for name in names:
                    family = families.get(name)
                    if family is None:
                        kind = CounterMetricFamily if counter else GaugeMetricFamily
                        family = families[name] = kind(
                            name, f"backend stat {key}", labels=[MODEL_LABEL]
                        )
                    family.add_metric([backend.model_name], value)
        yield from families.values()


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        label = [MODEL_LABEL]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token",
                              label, buckets=TTFT_BUCKETS, registry=reg)  # fmt: skip
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output chunks",
                             label, buckets=ITL_BUCKETS, registry=reg)  # fmt: skip
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency",
                             label, buckets=E2E_BUCKETS, registry=reg)  # fmt: skip
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Time a request "
                                    "waited in the engine's queue before it first ran", label,
                                    buckets=E2E_BUCKETS, registry=reg)  # fmt: skip
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens", label, registry=reg)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", label,
                                         registry=reg)  # fmt: skip
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up "
                                      "in the prefix cache", label, registry=reg)  # fmt: skip
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the "
                                   "prefix cache", label, registry=reg)  # fmt: skip
        self.http_requests = Counter("http_requests", "HTTP requests",
                                     ["method", "handler", "status"], registry=reg)  # fmt: skip
        self.http_latency = Histogram("http_request_duration_seconds", "HTTP request latency",
                                      ["method", "handler"], registry=reg)  # fmt: skip
        self._itl_by_model: dict[str, Histogram] = {}
        self.backend_stats = BackendStatsCollector()
        reg.register(self.backend_stats)

    def track_backends(self, backends: BackendsFn) -> None:
        self.backend_stats.backends = backends

    def observe_chunk(self, model: str, since_start_s: float, since_last_s: float | None) -> None:
        if since_last_s is None:
            self.ttft.labels(model).observe(since_start_s)
            return
        itl = self._itl_by_model.get(model)  # per token: skip `labels()`'s lock and checks
        if itl is None:
            itl = self._itl_by_model[model] = self.itl.labels(model)
        itl.observe(since_last_s)

    def observe_finish(self, entry: UsageEntry) -> None:
        model = entry.model
        self.prompt_tokens.labels(model).inc(entry.prompt_tokens)
        self.generation_tokens.labels(model).inc(entry.completion_tokens)
        self.prefix_queries.labels(model).inc(entry.prompt_tokens)
        self.prefix_hits.labels(model).inc(entry.cached_tokens)
        if entry.status != UsageStatus.REJECTED:
            self.e2e.labels(model).observe(entry.latency_ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_template(scope: Scope) -> str:
    """`/api/characters/{character_id}` for `/api/characters/chr_1`: bounded label values.

    Built from the path and its matched parameters (public ASGI data) rather than the route
    object, whose `path` lacks the prefixes of routers included in routers.
    """
    if scope.get("route") is None:
        return UNMATCHED_ROUTE
    names = {str(value): name for name, value in scope.get("path_params", {}).items()}
    segments = str(scope["path"]).split("/")
    return "/".join(f"{{{names[part]}}}" if part in names else part for part in segments)


class HttpMetricsMiddleware:
    """Counts every HTTP request by method, route template and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        finally:
            handler = route_template(scope)
            method = scope["method"]
            self.metrics.http_requests.labels(method, handler, str(status)).inc()
            self.metrics.http_latency.labels(method, handler).observe(time.perf_counter() - start)


router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    serving: ServingMetrics = request.app.state.metrics
    return Response(serving.render(), media_type=CONTENT_TYPE_LATEST)
