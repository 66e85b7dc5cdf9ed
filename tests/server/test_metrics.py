"""`/metrics`: vLLM-named serving series with values that match the requests just made, backend
gauges, and HTTP metrics by route template; a registry per app."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from talkloop.server.metrics import ServingMetrics
from tests.server.conftest import MODEL, LiveServer
from tests.server.metering_helpers import chat

pytestmark = pytest.mark.integration


def scrape(server: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with server.http() as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def model_value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return samples.get((name, (("model_name", MODEL),)), 0.0)


def test_serving_series_count_the_requests_exactly(server: LiveServer) -> None:
    _, key = server.new_tenant()
    before = scrape(server)
    usages = [chat(server, key, max_tokens=3).json()["usage"] for _ in range(2)]
    after = scrape(server)

    def delta(name: str) -> float:
        return model_value(after, name) - model_value(before, name)

    assert delta("vllm:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("vllm:generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert delta("vllm:prefix_cache_queries_total") == sum(u["prompt_tokens"] for u in usages)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert delta("vllm:prefix_cache_hits_total") == cached
    assert delta("vllm:time_to_first_token_seconds_count") == 2
    assert delta("vllm:e2e_request_latency_seconds_count") == 2
    assert delta("vllm:e2e_request_latency_seconds_sum") > 0
    assert delta("vllm:request_queue_time_seconds_count") == 2  # one per request, engine-timed
    assert (
        0
        <= delta("vllm:request_queue_time_seconds_sum")
        < delta("vllm:e2e_request_latency_seconds_sum")
    )
    chunks_after_first = sum(u["completion_tokens"] - 1 for u in usages)
    assert delta("vllm:inter_token_latency_seconds_count") == chunks_after_first


def test_backend_gauges_and_http_metrics_are_exposed(server: LiveServer) -> None:
    _, key = server.new_tenant()
    chat(server, key)
    samples = scrape(server)
    assert model_value(samples, "vllm:num_requests_running") == 0
    assert model_value(samples, "vllm:num_requests_waiting") == 0
    usage = model_value(samples, "vllm:kv_cache_usage_perc")
    assert 0.0 <= usage <= 1.0
    assert model_value(samples, "vllm:gpu_cache_usage_perc") == usage
    route = (("handler", "/v1/chat/completions"), ("method", "POST"), ("status", "200"))
    assert samples[("http_requests_total", route)] >= 1
    keys_route = (
        ("handler", "/admin/tenants/{tenant_id}/keys"),
        ("method", "POST"),
        ("status", "201"),
    )
    assert samples[("http_requests_total", keys_route)] >= 1  # a template, not an id
    histogram = (("handler", "/v1/chat/completions"), ("method", "POST"))
    assert samples[("http_request_duration_seconds_count", histogram)] >= 1


def test_each_app_has_its_own_registry() -> None:
    first, second = ServingMetrics(), ServingMetrics()
    first.prompt_tokens.labels("m").inc(5)
    assert second.registry.get_sample_value("vllm:prompt_tokens_total", {"model_name": "m"}) is None
    assert first.registry.get_sample_value("vllm:prompt_tokens_total", {"model_name": "m"}) == 5


class _SpeculatingBackend:
    model_name = "m"

    def stats(self) -> dict[str, float]:
        return {
            "num_requests_running": 1.0,
            "spec_decode_num_draft_tokens": 40.0,
            "spec_decode_num_accepted_tokens": 25.0,
        }


def test_speculative_totals_are_vllm_counters() -> None:
    metrics = ServingMetrics()
    metrics.track_backends(lambda: [_SpeculatingBackend()])  # type: ignore[list-item]
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    drafted = families["vllm:spec_decode_num_draft_tokens"]
    assert drafted.type == "counter"
    assert [(s.name, s.labels, s.value) for s in drafted.samples] == [
        ("vllm:spec_decode_num_draft_tokens_total", {"model_name": "m"}, 40.0)
    ]
    accepted = families["vllm:spec_decode_num_accepted_tokens"].samples[0]
    assert accepted.value == 25.0
    assert families["vllm:num_requests_running"].type == "gauge"
