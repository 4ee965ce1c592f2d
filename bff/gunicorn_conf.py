"""
gunicorn settings for production: `gunicorn -c bff/gunicorn_conf.py bff.app:app`.

uvicorn-worker does not map gunicorn's graceful_timeout to uvicorn, so the worker below sets uvicorn's
timeout_graceful_shutdown itself; gunicorn's own bound is a little longer, so uvicorn cancels streams
still running (each gets its Triton request cancelled) before gunicorn would kill the worker.
Environment: BFF_HOST/BFF_PORT, BFF_WORKERS (default 1 per CPU core is a good start), and everything in
bff/settings.py. Each worker has its own event loop, Triton channel and stream limit; the current model
is shared through Triton (bff/registry.py). Metrics at /metrics are per worker.
"""

from __future__ import annotations

import os
from typing import ClassVar

from uvicorn_worker import UvicornWorker

from bff.logs import FORMATTERS, HANDLER

GRACEFUL_S = float(os.environ.get("BFF_GRACEFUL_TIMEOUT_S", "30"))


class BffWorker(UvicornWorker):
    CONFIG_KWARGS: ClassVar[dict] = {**UvicornWorker.CONFIG_KWARGS, "timeout_graceful_shutdown": GRACEFUL_S}


bind = f"{os.environ.get('BFF_HOST', '0.0.0.0')}:{os.environ.get('BFF_PORT', '8003')}"
workers = int(os.environ.get("BFF_WORKERS", str(os.cpu_count() or 1)))
worker_class = "bff.gunicorn_conf.BffWorker"
graceful_timeout = GRACEFUL_S + 5
timeout = 60  # heartbeat only (async workers): not a bound on stream length
keepalive = 75  # above common load-balancer idle timeouts
accesslog = None  # the BFF logs one JSON line per request itself
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": FORMATTERS,
    "handlers": {"stderr": HANDLER},
    "loggers": {"bff": {"handlers": ["stderr"], "level": "INFO", "propagate": False}},
}
