"""
Every setting of the BFF, read once from environment variables into one frozen object that the app,
gunicorn's config (bff/gunicorn_conf.py) and `make serve` (tools/serve.py) all use. Each field says its
environment variable, its default and what it does; `python -m bff.settings` prints the table.

The generation defaults are the Triton model's own (backend/protocol.py), so a request without them gets
what a direct Triton client gets.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from backend.protocol import INPUT

SWAP_STRATEGIES = ("load-first", "drain-first")
MIN_KEY_CHARS = 16
TRUE = ("1", "true", "yes")


class MissingKey(ValueError):
    """No INTERNAL_API_KEY and not BFF_RUN_OPEN: the BFF never serves open by accident."""


def setting(env: str, default, doc: str):
    return field(default=default, metadata={"env": env, "doc": doc})


def _metrics_url(grpc_url: str) -> str:
    # Triton's default ports are grpc 8001 / metrics 8002; anything else must be given explicitly.
    host = urlsplit("//" + grpc_url).hostname or "127.0.0.1"
    return f"http://{host}:8002/metrics"


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    triton_urls: tuple[str, ...] = setting("BFF_TRITON_URLS", ("127.0.0.1:8001",),
                                           "Triton gRPC endpoints, comma separated (host:port)")
    triton_metrics_urls: tuple[str, ...] = setting("BFF_TRITON_METRICS_URLS", (),
                                                   "Triton /metrics URLs, same order (default http://host:8002/metrics)")
    api_key: str | None = setting("INTERNAL_API_KEY", None, "shared secret expected in X-Internal-API-Key "
                                                            "(required unless BFF_RUN_OPEN=1)")
    triton_admin_key: str | None = setting("BFF_TRITON_ADMIN_KEY", None, "key for Triton's restricted "
                                           "repository API (sent as the triton-admin-key header)")
    metrics_open: bool = setting("BFF_METRICS_OPEN", False, "1 = /metrics needs no key (for a Prometheus "
                                 "scraper that reaches the BFF only inside the cluster)")
    run_open: bool = setting("BFF_RUN_OPEN", False, "1 = serve without a key (local development only)")
    model: str | None = setting("BFF_MODEL", None, "model to serve when Triton has none loaded")
    model_repository: str = setting("BFF_MODEL_REPOSITORY", "model_repository", "model repository, for metadata.json")
    host: str = setting("BFF_HOST", "127.0.0.1", "listen address")
    port: int = setting("BFF_PORT", 8003, "listen port")
    workers: int = setting("BFF_WORKERS", 0, "gunicorn workers (0: one per CPU this process may use)")
    temperature: float = setting("BFF_TEMPERATURE", INPUT["temperature"].default, "generation default")
    top_k: int = setting("BFF_TOP_K", INPUT["top_k"].default, "generation default")
    max_tokens: int = setting("BFF_MAX_TOKENS", INPUT["max_tokens"].default, "generation default")
    min_answer_tokens: int = setting("BFF_MIN_ANSWER_TOKENS", 128, "a history longer than the context loses its "
                                     "oldest turns until min(max_tokens, this) tokens of answer fit")
    max_body_bytes: int = setting("BFF_MAX_BODY_BYTES", 1 << 20, "request body bound (413 above it)")
    max_streams: int = setting("BFF_MAX_STREAMS", 256, "concurrent streams per process (503 above it)")
    first_response_wait_s: float = setting("BFF_FIRST_RESPONSE_WAIT_S", 0.5, "how long /generate waits for "
                                           "Triton's first answer before committing the 200")
    ping_interval_s: float = setting("BFF_PING_INTERVAL_S", 5.0, "`: ping` comment after this long without a token")
    stream_silence_s: float = setting("BFF_STREAM_SILENCE_S", 300.0, "a stream whose Triton request has not "
                                      "answered for this long ends with an error event and is cancelled")
    model_load_timeout_s: float = setting("BFF_MODEL_LOAD_TIMEOUT_S", 600.0, "bound on one model load or unload "
                                          "call to Triton (504 past it)")
    swap_strategy: str = setting("BFF_SWAP_STRATEGY", "load-first", "load-first (both models fit) or drain-first")
    drain_timeout_s: float = setting("BFF_DRAIN_TIMEOUT_S", 60.0, "bound on waiting for old streams during a swap")
    probe_interval_s: float = setting("BFF_PROBE_INTERVAL_S", 2.0, "endpoint health probe period")
    graceful_timeout_s: float = setting("BFF_GRACEFUL_TIMEOUT_S", 30.0, "uvicorn's timeout_graceful_shutdown "
                                        "(gunicorn's bound is 5 s longer)")

    def __post_init__(self) -> None:
        if self.swap_strategy not in SWAP_STRATEGIES:
            raise ValueError(f"BFF_SWAP_STRATEGY must be one of {SWAP_STRATEGIES}, got {self.swap_strategy!r}")
        if not self.triton_urls:
            raise ValueError("BFF_TRITON_URLS names no endpoint")
        if self.triton_metrics_urls and len(self.triton_metrics_urls) != len(self.triton_urls):
            raise ValueError("BFF_TRITON_METRICS_URLS must list one URL per Triton endpoint")
        if not self.triton_metrics_urls:
            object.__setattr__(self, "triton_metrics_urls", tuple(_metrics_url(u) for u in self.triton_urls))
        for name in ("temperature", "top_k", "max_tokens", "min_answer_tokens"):
            spec, value = INPUT[name], getattr(self, name)
            if not spec.low <= value <= spec.high:
                raise ValueError(f"BFF_{name.upper()} must be in [{spec.low}, {spec.high}], got {value}")
        if self.ping_interval_s <= 0 or self.first_response_wait_s < 0:
            raise ValueError("BFF_PING_INTERVAL_S must be > 0 and BFF_FIRST_RESPONSE_WAIT_S >= 0")
        if self.stream_silence_s < self.ping_interval_s or self.model_load_timeout_s <= 0:
            raise ValueError("BFF_STREAM_SILENCE_S must be at least BFF_PING_INTERVAL_S, and "
                             "BFF_MODEL_LOAD_TIMEOUT_S > 0")
        if self.workers < 0:
            raise ValueError(f"BFF_WORKERS must be >= 0, got {self.workers}")
        if not self.api_key and not self.run_open:
            raise MissingKey("INTERNAL_API_KEY is not set; set it, or BFF_RUN_OPEN=1 for local development")
        if self.api_key and self.run_open:
            raise ValueError("BFF_RUN_OPEN=1 would serve without checking the INTERNAL_API_KEY that is set; "
                             "unset one of them")
        if self.api_key and len(self.api_key) < MIN_KEY_CHARS:
            raise ValueError(f"INTERNAL_API_KEY must be at least {MIN_KEY_CHARS} characters")

    @property
    def worker_count(self) -> int:
        # the CPUs this process may use (a container's cpuset), not the host's count that os.cpu_count() gives
        return self.workers or len(os.sched_getaffinity(0))


def _parse(f: dataclasses.Field, raw: str):
    kind = f.type
    if kind.startswith("tuple"):
        return _split(raw)
    if kind == "bool":
        return raw.lower() in TRUE
    if kind.startswith("int"):
        return int(raw)
    if kind.startswith("float"):
        return float(raw)
    return raw or None if "None" in kind else raw


def from_env(env: dict[str, str] | None = None, **overrides) -> Settings:
    """Settings from environment variables (os.environ by default); keyword overrides win."""
    env = os.environ if env is None else env
    values = {f.name: _parse(f, env[f.metadata["env"]]) for f in dataclasses.fields(Settings)
              if env.get(f.metadata["env"], "") != ""}
    return Settings(**{**values, **overrides})


def to_env(settings: Settings) -> dict[str, str]:
    """The environment variables that give these settings (for a server started as its own process)."""
    out = {}
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        if value is None:
            continue
        out[f.metadata["env"]] = ",".join(value) if isinstance(value, tuple) else (
            ("1" if value else "0") if isinstance(value, bool) else str(value))
    return out


def table() -> str:
    """The environment variables, their defaults and meanings, one a line."""
    return "\n".join(f"{f.metadata['env']:<26} {f.default!s:<22} {f.metadata['doc']}"
                     for f in dataclasses.fields(Settings))


if __name__ == "__main__":
    print(table())
