"""
The BFF's own figures, kept twice on purpose: Prometheus metrics for scraping (/metrics) and a window of
recent samples for the percentiles /stats reports directly. Under gunicorn the metrics are every worker's
(prometheus_client's multiprocess files, bff/gunicorn_conf.py); the window is the answering worker's alone.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter, deque

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.multiprocess import MultiProcessCollector

from bff.settings import METRICS_DIR_ENV

WINDOW = 10_000  # recent samples kept for /stats percentiles
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def _percentiles(samples: deque) -> dict[str, float | None]:
    if not samples:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    # "inclusive" interpolates between order statistics, as numpy's default percentile does
    cuts = statistics.quantiles(samples, n=100, method="inclusive") if len(samples) > 1 else [samples[0]] * 99
    return {f"p{q}_ms": round(cuts[q - 1] * 1000, 3) for q in (50, 95, 99)}


class BffStats:
    """Counters for streams, tokens and errors; TTFT and inter-token latency samples."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.p_requests = PromCounter("bff_requests", "HTTP requests by route and status", ["route", "code"],
                                      registry=r)
        self.p_streams = Gauge("bff_streams_active", "SSE streams in flight", multiprocess_mode="livesum",
                               registry=r)
        self.p_tokens = PromCounter("bff_generated_pieces", "text pieces streamed to clients", registry=r)
        self.p_errors = PromCounter("bff_errors", "errors by kind", ["kind"], registry=r)
        self.p_ends = PromCounter("bff_stream_ends", "how streams ended", ["reason"], registry=r)
        self.p_ttft = Histogram("bff_time_to_first_token_seconds", "request start to first piece",
                                buckets=LATENCY_BUCKETS, registry=r)
        self.p_itl = Histogram("bff_inter_token_latency_seconds", "gap between consecutive pieces",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.p_swaps = PromCounter("bff_model_swaps", "model swaps by result", ["result"], registry=r)
        self.started = time.time()
        self.active = 0
        self.total = 0
        self.tokens = 0
        self.errors: Counter[str] = Counter()
        self.ends: Counter[str] = Counter()
        self.ttft: deque[float] = deque(maxlen=WINDOW)
        self.itl: deque[float] = deque(maxlen=WINDOW)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format: this process's, or every gunicorn worker's merged."""
        if METRICS_DIR_ENV not in os.environ:
            return generate_latest(self.registry)
        merged = CollectorRegistry()  # the collector alone: these metrics in it too would be counted twice
        MultiProcessCollector(merged)
        return generate_latest(merged)

    def request(self, route: str, code: int) -> None:
        self.p_requests.labels(route, str(code)).inc()

    def error(self, kind: str) -> None:
        self.errors[kind] += 1
        self.p_errors.labels(kind).inc()

    def swap(self, result: str) -> None:
        self.p_swaps.labels(result).inc()

    def stream_started(self) -> None:
        self.active += 1
        self.total += 1
        self.p_streams.inc()

    def stream_ended(self, reason: str) -> None:
        self.active -= 1
        self.ends[reason] += 1
        self.p_streams.dec()
        self.p_ends.labels(reason).inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.append(seconds)
        self.p_ttft.observe(seconds)

    def piece(self, gap: float | None) -> None:
        """One piece streamed; `gap` is the time since the previous piece of the same stream."""
        self.tokens += 1
        self.p_tokens.inc()
        if gap is not None:
            self.itl.append(gap)
            self.p_itl.observe(gap)

    def snapshot(self) -> dict:
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "streams": {"active": self.active, "total": self.total, "ended": dict(self.ends)},
            "tokens_streamed": self.tokens,
            "ttft": _percentiles(self.ttft),
            "inter_token_latency": _percentiles(self.itl),
            "errors": dict(self.errors),
        }
