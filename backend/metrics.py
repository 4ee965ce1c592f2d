"""
Engine statistics, and their export as Triton custom metrics. The step thread only bumps plain numbers; the
response thread exports every poll interval. Each pb_utils metric call is a blocking IPC round trip into the server,
so nothing is exported per token: the inter-token latency is bucketed here and exported as a Prometheus histogram's
counters, which histogram_quantile() reads as usual.
"""

from __future__ import annotations

import bisect
import collections
import itertools

from backend import protocol as P
from backend.protocol import FINISH_REASONS

TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
E2E_BUCKETS = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
LENGTH_BUCKETS = [1, 8, 32, 128, 512, 1024, 2048, 4096, 8192]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]


class EngineStats:
    def __init__(self) -> None:
        self.tokens = 0  # generated (sampled or forced, stop tokens included)
        self.prompt_tokens = 0  # prompts of requests that reached decoding, whole
        self.prefix_hits = 0  # requests placed after a cached prefix
        self.reused_tokens = 0  # prompt tokens taken from a slot's cache
        self.prefilled_tokens = 0  # prompt tokens computed
        self.rejected = 0  # refused because the queue was full
        self.finished = dict.fromkeys(FINISH_REASONS, 0)  # requests ended, by finish reason
        self.send_errors = 0
        self.last_send_error = ""
        self.export_errors = 0
        self.last_export_error = ""
        self.healthy = 1  # 0 while the runner has failed unhealthy_after steps in a row
        self.active = 0  # slots in use
        self.waiting = 0  # requests queued for a slot
        self.ttft: collections.deque[float] = collections.deque()  # seconds, drained by the exporter
        # per request, drained by the exporter: (e2e seconds, queue seconds, prompt tokens, streamed tokens)
        self.requests: collections.deque[tuple[float, float, int, int]] = collections.deque()
        self.max_slots = 0  # for the usage ratio
        self.itl: collections.deque[float] = collections.deque()
        # CPU seconds per thread (time.thread_time): step thread (model_call: inside Runner.step), response thread
        # (send); schedule (step - model_call) + send per token is the per-token cost outside the model
        self.cpu = {"step": 0.0, "model_call": 0.0, "send": 0.0}
        self.runner_seconds = 0.0  # wall time inside Runner.step


class TritonMetrics:
    """EngineStats -> pb_utils.MetricFamily metrics labelled with the model name and instance device."""

    def __init__(self, pb_utils, labels: dict[str, str]) -> None:
        F = pb_utils.MetricFamily
        self.families = []  # a MetricFamily must outlive its Metrics, or they stop working

        def family(name: str, description: str, kind):
            self.families.append(F(name=name, description=description, kind=kind))
            return self.families[-1]

        self.counters = {
            "tokens": family(P.METRIC_GENERATED_TOKENS, "Tokens generated", F.COUNTER).Metric(labels=labels),
            "prompt_tokens": family(P.METRIC_PROMPT_TOKENS, "Prompt tokens of requests that reached decoding",
                                    F.COUNTER).Metric(labels=labels),
            "prefix_hits": family(P.METRIC_PREFIX_HITS, "Requests that started after a cached prefix",
                                  F.COUNTER).Metric(labels=labels),
            "reused_tokens": family(P.METRIC_PREFIX_REUSED, "Prompt tokens taken from the prefix cache",
                                    F.COUNTER).Metric(labels=labels),
            "prefilled_tokens": family(P.METRIC_PREFILLED, "Prompt tokens computed", F.COUNTER).Metric(labels=labels),
            "rejected": family(P.METRIC_REJECTED, "Requests refused because the queue was full",
                               F.COUNTER).Metric(labels=labels),
            "runner_seconds": family(P.METRIC_RUNNER_SECONDS, "Wall time inside the runner's steps (on a GPU, the "
                                     "device's busy time: its rate is the share of time the model runs)",
                                     F.COUNTER).Metric(labels=labels),
        }
        finished = family(P.METRIC_FINISHED, "Requests ended, by finish reason", F.COUNTER)
        self.finished = {reason: finished.Metric(labels={**labels, "finish_reason": reason})
                         for reason in FINISH_REASONS}
        self.gauges = {
            "active": family(P.METRIC_ACTIVE_SLOTS, "KV-cache rows in use", F.GAUGE).Metric(labels=labels),
            "waiting": family(P.METRIC_QUEUE_DEPTH, "Requests waiting for a slot", F.GAUGE).Metric(labels=labels),
            "healthy": family(P.METRIC_HEALTHY, "1, or 0 after repeated runner failures until a step succeeds",
                              F.GAUGE).Metric(labels=labels),
        }
        cpu = family(P.METRIC_CPU, "CPU time of the backend's threads by part", F.COUNTER)
        self.cpu = {part: cpu.Metric(labels={**labels, "part": part}) for part in ("schedule", "model_call", "send")}
        # a native histogram (Triton 2.51+): one sample per request
        self.ttft = family(P.METRIC_TTFT, "Time from arrival to the first token",
                           F.HISTOGRAM).Metric(labels=labels, buckets=TTFT_BUCKETS)
        # one sample each per finished request (not per token): an IPC call each is affordable here
        self.per_request = [
            family(P.METRIC_E2E, "Time from arrival to the final response", F.HISTOGRAM).Metric(
                labels=labels, buckets=E2E_BUCKETS),
            family(P.METRIC_QUEUE_TIME, "Time from arrival to a KV-cache slot", F.HISTOGRAM).Metric(
                labels=labels, buckets=E2E_BUCKETS),
            family(P.METRIC_REQUEST_PROMPT, "Prompt tokens of a request", F.HISTOGRAM).Metric(
                labels=labels, buckets=LENGTH_BUCKETS),
            family(P.METRIC_REQUEST_GENERATION, "Tokens streamed to a request", F.HISTOGRAM).Metric(
                labels=labels, buckets=LENGTH_BUCKETS),
        ]
        self.usage = family(P.METRIC_SLOT_USAGE, "KV-cache slots in use, as a fraction of all",
                            F.GAUGE).Metric(labels=labels)
        # one sample per token: _bucket{le} (cumulative), _sum and _count counters, at most one call per bucket
        itl = P.METRIC_ITL
        about = "Time between a request's tokens (a histogram's series, exported as counters)"
        buckets = family(itl + "_bucket", about, F.COUNTER)
        self.itl = [buckets.Metric(labels={**labels, "le": le}) for le in [*map(str, ITL_BUCKETS), "+Inf"]]
        self.itl_sum = family(itl + "_sum", about, F.COUNTER).Metric(labels=labels)
        self.itl_count = family(itl + "_count", about, F.COUNTER).Metric(labels=labels)
        self._last: dict[str, float] = collections.defaultdict(float)

    def _add(self, metric, key: str, value: float) -> None:
        delta = value - self._last[key]
        if delta > 0:
            metric.increment(delta)
            self._last[key] = value

    def export(self, stats: EngineStats) -> None:
        # endings are read first and written last: a scrape that counts a request as ended counts all it did
        # (the step thread counts its tokens and frees its slot before its ending)
        finished = dict(stats.finished)
        for key, metric in self.counters.items():
            self._add(metric, key, getattr(stats, key))
        cpu = dict(stats.cpu)
        cpu["schedule"] = cpu.pop("step") - cpu["model_call"]
        for part, metric in self.cpu.items():
            self._add(metric, "cpu_" + part, cpu[part])
        for key, metric in self.gauges.items():
            value = getattr(stats, key)
            if value != self._last.get("gauge_" + key):
                metric.set(value)
                self._last["gauge_" + key] = value
        while stats.ttft:
            self.ttft.observe(stats.ttft.popleft())
        while stats.requests:
            for metric, value in zip(self.per_request, stats.requests.popleft(), strict=True):
                metric.observe(value)
        ratio = stats.active / stats.max_slots if stats.max_slots else 0.0
        if ratio != self._last.get("usage"):
            self.usage.set(ratio)
            self._last["usage"] = ratio
        if stats.itl:
            cumulative, total = bucket_counts(stats.itl, ITL_BUCKETS)
            for metric, count in zip(self.itl, cumulative, strict=True):
                if count:
                    metric.increment(count)
            self.itl_sum.increment(total)
            self.itl_count.increment(cumulative[-1])  # the +Inf bucket counts every sample
        for reason, metric in self.finished.items():
            self._add(metric, "finished_" + reason, finished[reason])


def bucket_counts(values: collections.deque[float], bounds: list[float]) -> tuple[list[int], float]:
    """Drain values into cumulative bucket counts (le=bound for each bound, then +Inf) and their sum."""
    counts = [0] * (len(bounds) + 1)
    total = 0.0
    while values:
        v = values.popleft()
        counts[bisect.bisect_left(bounds, v)] += 1  # the first bound >= v: Prometheus' le is inclusive
        total += v
    return list(itertools.accumulate(counts)), total
