"""
/stats and /metrics of the live BFF after a known workload, read as before/after differences (the session's
BFF serves other tests too): every figure moves by exactly what the workload did.
"""

from __future__ import annotations

import httpx
import pytest

from tests.support.bffkit import is_done, wait_until
from tools import measure
from tools.bff_client import AUTH, generate, stats
from tools.measure import SERVER_TIMEOUT_S

pytestmark = pytest.mark.triton
BODY = {"messages": [{"role": "user", "content": "Count to ten."}], "temperature": 0, "max_tokens": 12}


def test_stats_and_metrics_count_a_known_workload(bff_url):
    stats_before = stats(bff_url)
    metrics_before = httpx.get(bff_url + "/metrics", headers=AUTH, timeout=SERVER_TIMEOUT_S).text
    pieces = 0
    for _ in range(3):
        r, events = generate(bff_url, BODY)
        assert r.status_code == 200 and is_done(events[-1])
        pieces += len(events) - 1
    bad, _ = generate(bff_url, {"messages": [], "max_tokens": 1})
    assert bad.status_code == 400
    after = stats(bff_url)
    metrics = httpx.get(bff_url + "/metrics", headers=AUTH, timeout=SERVER_TIMEOUT_S)

    bff, was = after["bff"], stats_before["bff"]
    assert bff["streams"]["total"] - was["streams"]["total"] == 3 and bff["streams"]["active"] == 0
    assert bff["streams"]["ended"]["done"] - was["streams"]["ended"].get("done", 0) == 3
    assert bff["tokens_streamed"] - was["tokens_streamed"] == pieces
    assert bff["errors"] == was["errors"]  # a 400 is the client's error, not the service's
    for series in ("ttft", "inter_token_latency"):
        p = bff[series]
        assert 0 < p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"] < 60_000, (series, p)
    assert after["swap"]["current_model"] == "head" and after["swap"]["state"] == "idle"
    (endpoint,) = after["endpoints"]
    assert endpoint["up"] and endpoint["active_streams"] == 0
    model_stats = {m["name"]: m for m in next(iter(after["triton"]["model_stats"].values()))}
    assert int(model_stats["head"]["inference_stats"]["success"]["count"]) >= 3
    backend = next(iter(after["triton"]["backend"].values()))
    assert {s["labels"]["model"] for s in backend["nanochat_active_slots"]} >= {"head"}  # the backend's own gauges
    # every prompt token is counted once, reused from a slot or prefilled (the backend exports every POLL_S, 0.25 s)
    prompt = events[-1]["usage"]["prompt_tokens"]

    def cache_counts(s: dict) -> tuple[int, int]:
        pc = s["triton"]["prefix_cache"]
        return pc["reused_tokens"], pc["prefilled_tokens"]

    def counted() -> bool:
        now = stats(bff_url)
        moved = [a - b for a, b in zip(cache_counts(now), cache_counts(stats_before), strict=True)]
        return sum(moved) == 3 * prompt and 0 <= now["triton"]["prefix_cache"]["token_hit_rate"] <= 1
    wait_until(counted, "the backend's prefix-cache counters did not count the three prompts")

    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    moved = lambda name, **labels: measure.metric(metrics.text, name, **labels) - measure.metric(
        metrics_before, name, **labels)
    assert moved("bff_requests_total", route="/generate", code="200") == 3
    assert moved("bff_requests_total", route="/generate", code="400") == 1
    assert moved("bff_generated_pieces_total") == pieces
    assert moved("bff_stream_ends_total", reason="done") == 3
    assert moved("bff_time_to_first_token_seconds_count") == 3
    assert moved("bff_inter_token_latency_seconds_count") == pieces - 3
    assert measure.metric(metrics.text, "bff_streams_active") == 0


def test_the_metrics_read_from_a_scrape_are_what_a_parse_of_all_of_it_gives(triton_server, bff_url):
    """The BFF and the tools parse only the lines of the metrics they read (bff.triton_metrics.lines_of); on a
    real scrape of five models after traffic, that is what prometheus_client's parse of the whole text gives."""
    from prometheus_client.parser import text_string_to_metric_families

    from backend.protocol import METRIC_HEALTHY, METRIC_ITL
    from bff.triton_metrics import BACKEND_METRICS, families

    assert generate(bff_url, BODY)[0].status_code == 200
    text = measure.scrape(triton_server.metrics_url)
    whole = list(text_string_to_metric_families(text))
    for prefixes in ((METRIC_HEALTHY,), BACKEND_METRICS, ("nv_inference_count", "nv_cpu")):
        want = {f.name: [{"labels": s.labels, "value": s.value} for s in f.samples]
                for f in whole if f.name.startswith(prefixes)}
        assert want and families(text, prefixes) == want, prefixes
    for name in (METRIC_HEALTHY, f"{METRIC_ITL}_bucket", "nv_inference_count_total", "nv_inference_count"):
        want = [(s.labels, s.value) for f in whole for s in f.samples
                if name in (s.name, f.name if f.type == "counter" else None)]
        assert want and measure.samples(text, name) == want, name
