"""
One JSON object per log line, for every logger of the BFF: a request's line carries its fields as a dict
(`log.info({...})`), anything else becomes {"level", "logger", "message"}.
"""

from __future__ import annotations

import logging
import logging.config

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # pid: which gunicorn worker wrote the line (their lines interleave on one stream)
        line = {"ts": round(record.created, 3), "pid": record.process, "level": record.levelname.lower(),
                "logger": record.name}
        if isinstance(record.msg, dict):
            line.update(record.msg)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


# gunicorn's logconfig_dict (bff/gunicorn_conf.py) and setup() share these definitions.
FORMATTERS = {"json": {"()": JsonFormatter}}
HANDLER = {"class": "logging.StreamHandler", "formatter": "json"}
# httpx logs each request at info: the prober reads Triton's metrics every probe interval, a line each time.
QUIET = {"httpx": {"level": "WARNING"}}


def setup(level: str = "INFO") -> None:
    """JSON lines on stderr for the root logger (uvicorn's own access log stays off: the BFF writes its own)."""
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False, "formatters": FORMATTERS,
                               "handlers": {"stderr": HANDLER}, "root": {"handlers": ["stderr"], "level": level},
                               "loggers": QUIET})
