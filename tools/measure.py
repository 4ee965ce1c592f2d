"""
What the benchmarks and the tests measure with, defined once: percentiles of latency samples, the
reading of Prometheus text (Triton's /metrics, the BFF's) through prometheus_client's own parser, and how
long they wait on a local server.
"""

from __future__ import annotations

import time
import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from backend.protocol import METRIC_FINISHED
from bff.triton_metrics import lines_of

# One call to a local server (a model load or unload, a swap, a health, stats or metrics read, a stream's next
# bytes) on a loaded 2-core machine: a load alone can pass httpx's default 5 s there. A bound on a hang, not a
# speed check.
SERVER_TIMEOUT_S = 60.0
# Waiting for an outcome there (a model unloaded, a slot freed, a counter exported): polled, so a condition that
# already holds costs nothing.
OUTCOME_TIMEOUT_S = 30.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100, linear interpolation as numpy's default); NaN without samples."""
    return float(np.percentile(values, q)) if len(values) else float("nan")


def scrape(url: str, timeout: float = SERVER_TIMEOUT_S) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` whose labels include `labels`. The parser names a
    counter's samples <family>_total, so a counter exported without that suffix (the backend's
    inter-token histogram series, x_bucket and x_count) is found by its family's name."""
    # only the lines that can hold it are parsed: Triton writes a counter's samples without the _total
    lines = lines_of(text, (name.removesuffix("_total"),))
    return [(s.labels, s.value) for family in text_string_to_metric_families(lines) for s in family.samples
            if name in (s.name, family.name if family.type == "counter" else None)
            and all(s.labels.get(k) == v for k, v in labels.items())]


def metric(text_or_url: str, name: str, **labels: str) -> float:
    """The sum of those samples (0 when there are none); a URL is scraped first."""
    text = scrape(text_or_url) if text_or_url.startswith("http") else text_or_url
    return sum(value for _, value in samples(text, name, **labels))


def metrics_once_ended(metrics_url: str, model: str, ended: int, timeout: float = OUTCOME_TIMEOUT_S) -> str:
    """Triton's /metrics text once it counts `ended` requests of `model` as ended (every finish reason): the
    backend writes a request's ending after all its other counts (backend/metrics.py), so the text has those."""
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(metrics_url)
        if (now := metric(text, METRIC_FINISHED, model=model)) == ended:
            return text
        if now > ended or time.monotonic() > deadline:
            raise AssertionError(f"{model}: {now} requests ended, not {ended}")
        time.sleep(0.05)
