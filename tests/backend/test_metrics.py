"""The metrics exporter alone, with a fake pb_utils that records each (IPC-costly) metric call."""

import collections

import pytest

from backend.metrics import ITL_BUCKETS, EngineStats, TritonMetrics, bucket_counts

CALLS: list[tuple] = []  # (family, label other than model, operation, value), one per metric call


class FakeMetric:
    def __init__(self, family: str, labels: dict):
        self.key = (family, next((v for k, v in labels.items() if k != "model"), None))

    def increment(self, v):
        CALLS.append((*self.key, "inc", v))

    def set(self, v):
        CALLS.append((*self.key, "set", v))

    def observe(self, v):
        CALLS.append((*self.key, "observe", v))


class FakePbUtils:
    class MetricFamily:
        COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

        def __init__(self, name, description, kind):
            self.name = name

        def Metric(self, labels, buckets=None):
            return FakeMetric(self.name, labels)


def test_bucket_counts_are_cumulative_with_inclusive_bounds():
    values = collections.deque([0.001, 0.0011, 0.003, 0.2, 7.0])
    cumulative, total = bucket_counts(values, [0.001, 0.0025, 0.005, 1.0])
    assert cumulative == [1, 2, 3, 4, 5] and total == pytest.approx(7.2051)
    assert not values  # drained


def test_itl_costs_one_call_per_bucket_not_one_per_token():
    CALLS.clear()
    metrics, stats = TritonMetrics(FakePbUtils, {"model": "m"}), EngineStats()
    stats.itl.extend([0.002] * 500 + [0.03] * 100)
    stats.ttft.extend([0.04, 0.06])
    metrics.export(stats)
    itl = {(f, le): v for f, le, op, v in CALLS if f.startswith("nanochat_inter_token_latency_seconds")}
    buckets = {le: v for (f, le), v in itl.items() if f.endswith("_bucket")}
    assert len(itl) <= len(ITL_BUCKETS) + 3
    assert buckets["0.0025"] == 500 and buckets["0.05"] == 600 and buckets["+Inf"] == 600 and "0.001" not in buckets
    assert itl[("nanochat_inter_token_latency_seconds_count", None)] == 600
    assert itl[("nanochat_inter_token_latency_seconds_sum", None)] == pytest.approx(4.0)
    assert [v for f, _, op, v in CALLS if op == "observe"] == [0.04, 0.06]  # TTFT: a native histogram
    CALLS.clear()
    metrics.export(stats)  # nothing new: no ITL calls at all
    assert not [c for c in CALLS if c[0].startswith("nanochat_inter_token")]


def test_finished_requests_are_counted_by_reason_as_deltas():
    CALLS.clear()
    metrics, stats = TritonMetrics(FakePbUtils, {"model": "m"}), EngineStats()
    stats.finished.update(stop=3, cancelled=1)
    metrics.export(stats)
    stats.finished["cancelled"] += 2
    metrics.export(stats)
    finished = [(reason, v) for f, reason, op, v in CALLS if f == "nanochat_finished_requests_total"]
    assert finished == [("stop", 3), ("cancelled", 1), ("cancelled", 2)]


def test_a_request_that_ends_during_an_export_is_counted_as_ended_with_all_it_did():
    """A scrape that counts a request as ended counts its tokens too: the exporter reads the endings before
    anything else and writes them after everything else (tests wait on endings, then read the rest)."""

    class EndsDuringExport(EngineStats):
        def __getattribute__(self, name):
            value = super().__getattribute__(name)
            if name == "tokens" and not self.__dict__.get("ended"):  # the step thread, mid-export
                self.__dict__.update(ended=True, tokens=value + 5)
                self.finished["stop"] += 1
            return value

    CALLS.clear()
    metrics, stats = TritonMetrics(FakePbUtils, {"model": "m"}), EndsDuringExport()
    metrics.export(stats)
    assert not [c for c in CALLS if c[0] == "nanochat_finished_requests_total"]  # its tokens were not written
    CALLS.clear()
    metrics.export(stats)
    assert ("nanochat_generated_tokens_total", None, "inc", 5) in CALLS
    assert CALLS[-1] == ("nanochat_finished_requests_total", "stop", "inc", 1)  # written after everything else
