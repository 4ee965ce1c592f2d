"""
gunicorn for production: `gunicorn -c bff/gunicorn_conf.py bff.app:app`, every value from bff/settings.py. Each
worker has its own event loop, Triton channels and stream limit; the served model is shared through Triton
(bff/registry.py). Metrics are one set: workers write prometheus_client's multiprocess files in a directory this
master owns, and any worker's /metrics merges them.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import ClassVar

from gunicorn.arbiter import Arbiter
from gunicorn.workers.base import Worker
from uvicorn_worker import UvicornWorker

from bff.logs import FORMATTERS, HANDLER, QUIET
from bff.settings import METRICS_DIR_ENV, from_env

SETTINGS = from_env()


# uvicorn-worker does not pass gunicorn's graceful_timeout to uvicorn, so the worker sets uvicorn's own; gunicorn's
# bound is 5 s longer, so uvicorn cancels the streams still running (and their Triton requests) before gunicorn
# would kill the worker
class BffWorker(UvicornWorker):
    CONFIG_KWARGS: ClassVar[dict] = {**UvicornWorker.CONFIG_KWARGS,
                                     "timeout_graceful_shutdown": SETTINGS.graceful_timeout_s}


bind = f"{SETTINGS.host}:{SETTINGS.port}"
workers = SETTINGS.worker_count()
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


# A fresh private directory per master, set before workers fork and import prometheus_client (it picks its
# multiprocess mode at import): files left by another run would add their counts to ours. Not at module level,
# since gunicorn re-reads this file on SIGHUP.
def on_starting(server: Arbiter) -> None:
    os.environ[METRICS_DIR_ENV] = tempfile.mkdtemp(prefix="bff-metrics-")


def child_exit(server: Arbiter, worker: Worker) -> None:
    from prometheus_client import multiprocess  # the master never imports it before the directory is set

    multiprocess.mark_process_dead(worker.pid)  # its live gauges (streams in flight) leave the sums


def on_exit(server: Arbiter) -> None:
    shutil.rmtree(os.environ[METRICS_DIR_ENV], ignore_errors=True)
