"""
Triton's /metrics, scraped over HTTP and read with prometheus_client's text parser (the one parser here): the
nanochat backend's own figures for /stats, and its health gauge, which the prober reads to route around a
model whose runner keeps failing.
"""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families

from backend.protocol import METRIC_HEALTHY, METRIC_PREFILLED, METRIC_PREFIX, METRIC_PREFIX_HITS, METRIC_PREFIX_REUSED
from bff.triton import PROBE_TIMEOUT_S, Endpoint, TritonPool

# The nanochat backend's own metrics (slots, queue, ...) and Triton's pending-request count, for /stats.
BACKEND_METRICS = (METRIC_PREFIX, "nv_inference_pending_request_count")


def lines_of(text: str, prefixes: tuple[str, ...]) -> str:
    """The part of a scrape about the metrics named with one of `prefixes`: their samples and their # HELP and
    # TYPE lines, in order. The parser is pure Python and a scrape is mostly other metrics (every model's
    histograms): the prober parsed a whole scrape, 18 ms of CPU for three models here, every two seconds in every
    BFF worker (71 s of the test suite's CPU); the health gauge's lines alone take 0.45 ms."""
    keep = [line for line in text.splitlines()
            if (line[7:] if line.startswith(("# HELP ", "# TYPE ")) else line).startswith(prefixes)]
    return "\n".join(keep) + "\n" if keep else ""


def families(text: str, prefixes: tuple[str, ...]) -> dict[str, list[dict]]:
    """The samples ({labels, value}) of each metric family named with one of `prefixes`. The parser names a
    counter's family without its _total."""
    out: dict[str, list[dict]] = {}
    for family in text_string_to_metric_families(lines_of(text, prefixes)):
        if family.name.startswith(prefixes):
            out[family.name] = [{"labels": s.labels, "value": s.value} for s in family.samples]
    return out


def backend_metrics(text: str) -> dict[str, list[dict]]:
    return families(text, BACKEND_METRICS)


def prefix_cache(backends: dict[str, dict[str, list[dict]]]) -> dict:
    """The backends' prefix-cache counters summed over endpoints and models, and the share of prompt tokens
    taken from the cache (None before any prompt)."""
    def total(metric: str) -> int:
        return int(sum(s["value"] for b in backends.values() for s in b.get(metric.removesuffix("_total"), [])))

    hits, reused, prefilled = (total(m) for m in (METRIC_PREFIX_HITS, METRIC_PREFIX_REUSED, METRIC_PREFILLED))
    rate = round(reused / (reused + prefilled), 4) if reused + prefilled else None
    return {"hits": hits, "reused_tokens": reused, "prefilled_tokens": prefilled, "token_hit_rate": rate}


def sick(text: str, model: str) -> bool:
    """`model` reports METRIC_HEALTHY 0 in this scrape: its runner failed step after step."""
    try:
        samples = families(text, (METRIC_HEALTHY,)).get(METRIC_HEALTHY, [])
    except ValueError:  # not Prometheus text (another server on that port): it says nothing of health
        return False
    return any(s["labels"].get("model") == model and s["value"] == 0 for s in samples)


class TritonMetrics:
    """The scrapes of a pool's endpoints' metrics ports."""

    def __init__(self, pool: TritonPool) -> None:
        self.pool = pool
        self.http = httpx.AsyncClient(timeout=PROBE_TIMEOUT_S)

    async def text(self, endpoints: list[Endpoint] | None = None) -> dict[str, str]:
        """The raw Prometheus text of each endpoint's /metrics (default: the live ones); "" where it fails."""
        async def one(endpoint: Endpoint) -> str:
            try:
                return (await self.http.get(endpoint.metrics_url)).text
            except httpx.HTTPError:
                return ""

        endpoints = self.pool.live() if endpoints is None else endpoints
        texts = await asyncio.gather(*(one(e) for e in endpoints))
        return {e.url: text for e, text in zip(endpoints, texts, strict=True)}

    async def unhealthy(self, model: str, endpoints: list[Endpoint]) -> list[Endpoint]:
        """Of `endpoints`, those where `model` is sick. Its is_ready() says so to Triton releases that ask the
        Python backend; this works on every release."""
        texts = await self.text(endpoints)
        return [e for e in endpoints if sick(texts[e.url], model)]

    async def close(self) -> None:
        await self.http.aclose()
