"""
One resource per route besides /generate (bff/generate.py). They share the Service (bff/app.py), whose
Triton pool and model registry exist once the lifespan startup has run.
"""

from __future__ import annotations

import falcon
from prometheus_client import CONTENT_TYPE_LATEST

from bff.triton_metrics import backend_metrics, prefix_cache
from bff.validation import OPENAPI_TEXT, SWAP, check, read_json


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
        metrics = await svc.metrics.text()
        backends = {url: backend_metrics(text) for url, text in metrics.items()}
        resp.media = {
            "bff": svc.stats.snapshot(),  # this worker's alone: its percentile window cannot merge across workers
            "swap": {**svc.registry.swap_state, "current_model": svc.registry.current,
                     "strategy": svc.settings.swap_strategy},
            "endpoints": [{"url": e.url, "up": e.up, "serving": sorted(e.serving), "active_streams": e.active,
                           "streams_total": e.opened} for e in svc.pool.endpoints],
            "triton": {
                "model_stats": await svc.control.statistics(),
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
        resp.data = self.service.stats.exposition()


class OpenApi:
    async def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "application/yaml"
        resp.text = OPENAPI_TEXT
