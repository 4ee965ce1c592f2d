"""
One JSON object per log line, for every logger of the BFF: a request's line carries its fields as a dict
(`log.info({...})`), anything else becomes {"level", "logger", "message"}.
"""

from __future__ import annotations

import logging

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name}
        if isinstance(record.msg, dict):
            line.update(record.msg)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


# gunicorn's logconfig_dict and setup() share this handler definition.
HANDLER = {"class": "logging.StreamHandler", "formatter": "json"}
FORMATTERS = {"json": {"()": "bff.logs.JsonFormatter"}}


def setup(level: int = logging.INFO) -> None:
    """JSON lines on stderr for the root logger (uvicorn's own access log stays off: the BFF writes its own)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
