"""
One resource per route besides /generate (bff/generate.py). They share the Service (bff/app.py), whose
Triton pool and model registry exist once the lifespan startup has run.
"""

from __future__ import annotations

import falcon
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from backend.protocol import METRIC_PREFILLED, METRIC_PREFIX, METRIC_PREFIX_HITS, METRIC_PREFIX_REUSED
from bff.validation import OPENAPI_TEXT, SWAP, check, read_json

# The nanochat backend's own metrics (slots, queue, ...) and Triton's pending-request count, picked from
# Triton's /metrics for /stats.
BACKEND_METRICS = (METRIC_PREFIX, "nv_inference_pending_request_count")


def backend_metrics(text: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith(BACKEND_METRICS):
            out[family.name] = [{"labels": s.labels, "value": s.value} for s in family.samples]
    return out


def prefix_cache(backends: dict[str, dict[str, list[dict]]]) -> dict:
    """The backends' prefix-cache counters summed over endpoints and models, and the share of prompt tokens
    taken from the cache (None before any prompt)."""
    def total(metric: str) -> int:  # the text parser names a counter's family without its _total
        return int(sum(s["value"] for b in backends.values() for s in b.get(metric.removesuffix("_total"), [])))

    hits, reused, prefilled = (total(m) for m in (METRIC_PREFIX_HITS, METRIC_PREFIX_REUSED, METRIC_PREFILLED))
    rate = round(reused / (reused + prefilled), 4) if reused + prefilled else None
    return {"hits": hits, "reused_tokens": reused, "prefilled_tokens": prefilled, "token_hit_rate": rate}


class Health:
    public = True  # no key: orchestrators probe it

    def __init__(self, service) -> None:
        self.service = service

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        registry = self.service.registry  # no call to Triton here: the prober's last answer (bff/app.py)
        resp.media = {"status": "ok", "ready": registry.ready, "current_model": registry.current}


class Models:
    def __init__(self, service) -> None:
        self.service = service

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        registry = self.service.registry
        resp.media = {"current_model": registry.current, "models": await registry.models()}


class Swap:
    def __init__(self, service) -> None:
        self.service = service

    async def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = await read_json(req, self.service.settings.max_body_bytes)
        check(SWAP, body)
        resp.media = await self.service.registry.swap(body["model_tag"])
        resp.status = falcon.HTTP_202


class Stats:
    def __init__(self, service) -> None:
        self.service = service

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        svc = self.service
        metrics = await svc.pool.metrics_text()
        backends = {url: backend_metrics(text) for url, text in metrics.items()}
        resp.media = {
            "bff": svc.stats.snapshot(),
            "swap": {**svc.registry.swap_state, "current_model": svc.registry.current,
                     "strategy": svc.settings.swap_strategy},
            "endpoints": [{"url": e.url, "up": e.up, "serving": sorted(e.serving), "active_streams": e.active,
                           "streams_total": e.opened} for e in svc.pool.endpoints],
            "triton": {
                "model_stats": await svc.pool.statistics(),
                "backend": backends,
                "prefix_cache": prefix_cache(backends),
            },
        }


class Metrics:
    def __init__(self, service) -> None:
        self.service = service
        self.public = service.settings.metrics_open  # BFF_METRICS_OPEN: Prometheus scrapes without the key

    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = generate_latest(self.service.stats.registry)


class OpenApi:
    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "application/yaml"
        resp.text = OPENAPI_TEXT
