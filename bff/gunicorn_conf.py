"""
gunicorn for production: `gunicorn -c bff/gunicorn_conf.py bff.app:app`, every value from bff/settings.py. Each
worker has its own event loop, Triton channels, stream limit and metrics; the served model is shared through
Triton (bff/registry.py).
"""

from __future__ import annotations

import math
from typing import ClassVar

from uvicorn_worker import UvicornWorker

from bff.logs import FORMATTERS, HANDLER, QUIET
from bff.settings import from_env

SETTINGS = from_env()


# uvicorn-worker does not pass gunicorn's graceful_timeout to uvicorn, so the worker sets uvicorn's own; gunicorn's
# bound is 5 s longer, so uvicorn cancels the streams still running (and their Triton requests) before gunicorn
# would kill the worker
class BffWorker(UvicornWorker):
    CONFIG_KWARGS: ClassVar[dict] = {**UvicornWorker.CONFIG_KWARGS,
                                     "timeout_graceful_shutdown": SETTINGS.graceful_timeout_s}


bind = f"{SETTINGS.host}:{SETTINGS.port}"
workers = SETTINGS.worker_count
worker_class = "bff.gunicorn_conf.BffWorker"
# gunicorn takes whole seconds only (a float fails its start)
graceful_timeout = math.ceil(SETTINGS.graceful_timeout_s) + 5
timeout = 60  # heartbeat only (async workers): not a bound on stream length
keepalive = 75  # above common load-balancer idle timeouts
accesslog = None  # the BFF logs one JSON line per request itself
control_socket_disable = True  # gunicorn 27's control socket: unused, and user 10001 may have no writable $HOME
# gunicorn merges this over its own defaults one top-level key at a time, so root and gunicorn's loggers are
# named here (its default root names a handler this replaces). uvicorn's workers copy gunicorn.error's handlers
# for uvicorn.error; the BFF writes its own access line, so gunicorn.access gets none.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": FORMATTERS,
    "handlers": {"stderr": HANDLER},
    "root": {"handlers": ["stderr"], "level": "INFO"},
    "loggers": {
        "gunicorn.error": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "gunicorn.access": {"handlers": [], "level": "INFO", "propagate": False},
        **QUIET,
    },
}
