"""
The Falcon ASGI app: `create_app(settings)` wires settings, middleware, media handlers, error
serialization and routes. `app` (module attribute, built lazily from the environment) is what uvicorn
and gunicorn import: `uvicorn bff.app:app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

import falcon
import falcon.asgi
import falcon.media
import orjson

from bff import errors, logs, resources
from bff.generate import Generate
from bff.middleware import ApiKey, RequestId
from bff.model_control import ModelControl
from bff.openai import ChatCompletions, V1Models
from bff.registry import Registry
from bff.settings import Settings, from_env
from bff.stats import BffStats
from bff.streaming import Streams
from bff.triton import TritonPool
from bff.triton_metrics import TritonMetrics

log = logging.getLogger("bff")


@dataclass
class Triton:
    """The BFF's doors to Triton: streams and routing, repository control, metrics scrapes."""

    pool: TritonPool
    control: ModelControl
    metrics: TritonMetrics


def connect(settings: Settings) -> Triton:
    pool = TritonPool(settings.triton_urls, settings.triton_metrics_urls)
    return Triton(pool, ModelControl(pool, settings.triton_admin_key), TritonMetrics(pool))


class Service:
    """What the resources share. The doors to Triton are made at lifespan startup, inside the worker's own
    event loop (a gRPC channel is bound to the loop it was made in), and closed at shutdown."""

    def __init__(self, settings: Settings, connect: Callable[[Settings], Triton]) -> None:
        self.settings = settings
        self.connect = connect
        self.stats = BffStats()
        self.streams = Streams(self)
        self.pool: TritonPool
        self.control: ModelControl
        self.metrics: TritonMetrics
        self.registry: Registry
        self._probe: asyncio.Task | None = None

    async def process_startup(self, scope: dict, event: dict) -> None:
        triton = self.connect(self.settings)
        self.pool, self.control, self.metrics = triton.pool, triton.control, triton.metrics
        self.registry = Registry(self.settings, self.pool, self.control, self.metrics, self.stats)
        await self.registry.start()
        await self.registry.probe()
        self._probe = asyncio.create_task(self._probe_forever())

    async def process_shutdown(self, scope: dict, event: dict) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await asyncio.gather(self.pool.close(), self.metrics.close(), return_exceptions=True)

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.probe_interval_s)
            try:
                await self.pool.probe()
                await self.registry.probe()
            except Exception:  # the probe must outlive any one failure
                log.exception("endpoint probe failed")


def create_app(settings: Settings, connect: Callable[[Settings], Triton] = connect) -> falcon.asgi.App:
    """The app; `connect` makes its doors to Triton (the in-process tests pass fakes)."""
    service = Service(settings, connect)
    middleware = [service, RequestId(service.stats)]
    if not settings.run_open:
        middleware.append(ApiKey(settings.api_key))
    app = falcon.asgi.App(middleware=middleware)

    json = falcon.media.JSONHandler(dumps=orjson.dumps, loads=orjson.loads)
    app.req_options.media_handlers[falcon.MEDIA_JSON] = json
    app.resp_options.media_handlers[falcon.MEDIA_JSON] = json
    app.resp_options.xml_error_serialization = False
    app.set_error_serializer(errors.serialize)

    app.add_route("/health", resources.Health(service))
    app.add_route("/generate", Generate(service))
    app.add_route("/models", resources.Models(service))
    app.add_route("/models/swap", resources.Swap(service))
    app.add_route("/stats", resources.Stats(service))
    app.add_route("/metrics", resources.Metrics(service))
    app.add_route("/openapi.yaml", resources.OpenApi())
    app.add_route("/v1/models", V1Models(service))
    app.add_route("/v1/chat/completions", ChatCompletions(service))
    return app


def __getattr__(name: str):
    # `bff.app:app` for servers, built on first access so importing this module has no side effects.
    if name == "app":
        if not logging.getLogger().handlers:  # JSON lines on stderr, unless a server configured logging
            logs.setup()
        app = create_app(from_env())
        # This process is a server (a uvicorn process or a gunicorn worker): what is alive now (modules, the app)
        # lives as long as it, so it leaves the collector's sight, and a full collection walks what requests made,
        # not some 90,000 objects (50 ms with every stream stalled, under load; docs/benchmarks.md). Garbage
        # first: what is frozen is never freed.
        gc.collect()
        gc.freeze()
        return app
    raise AttributeError(name)
