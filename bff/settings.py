"""
Every setting of the BFF, read once from environment variables into one frozen object.

    BFF_TRITON_URLS          Triton gRPC endpoints, comma separated (host:port)   127.0.0.1:8001
    BFF_TRITON_METRICS_URLS  Triton /metrics URLs, same order (optional)         derived: http://host:8002/metrics
    INTERNAL_API_KEY         shared secret expected in X-Internal-API-Key         (required unless BFF_RUN_OPEN=1)
    BFF_RUN_OPEN             1 = serve without a key (local development only)     0
    BFF_MODEL                model to serve when Triton has none loaded           (none)
    BFF_MODEL_REPOSITORY     model repository folder, for metadata.json           model_repository
    BFF_HOST, BFF_PORT       listen address (bff.serve)                           127.0.0.1, 8003
    BFF_TEMPERATURE, BFF_TOP_K, BFF_MAX_TOKENS   generation defaults             0.8, 50, 512
    BFF_MIN_ANSWER_TOKENS    a history longer than the context loses its oldest turns until
                             min(max_tokens, this) tokens of answer fit (1..4096)   128
    BFF_MAX_BODY_BYTES       request body bound (413 above it)                    1048576
    BFF_MAX_STREAMS          concurrent streams per process (503 above it)        256
    BFF_FIRST_RESPONSE_WAIT_S  how long /generate waits for Triton's first answer before committing 200   0.5
    BFF_PING_INTERVAL_S      `: ping` comment after this long without a token     5
    BFF_SWAP_STRATEGY        load-first (both models fit) or drain-first          load-first
    BFF_DRAIN_TIMEOUT_S      bound on waiting for old streams during a swap      60
    BFF_PROBE_INTERVAL_S     endpoint health probe period                         2
    BFF_GRACEFUL_TIMEOUT_S   uvicorn timeout_graceful_shutdown (gunicorn adds 5)  30
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

SWAP_STRATEGIES = ("load-first", "drain-first")


def _metrics_url(grpc_url: str) -> str:
    # Triton's default ports are grpc 8001 / metrics 8002; anything else must be given explicitly.
    host = urlsplit("//" + grpc_url).hostname or "127.0.0.1"
    return f"http://{host}:8002/metrics"


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    triton_urls: tuple[str, ...] = ("127.0.0.1:8001",)
    triton_metrics_urls: tuple[str, ...] = ()
    api_key: str | None = None
    run_open: bool = False
    model: str | None = None
    model_repository: str = "model_repository"
    host: str = "127.0.0.1"
    port: int = 8003
    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512
    min_answer_tokens: int = 128
    max_body_bytes: int = 1 << 20
    max_streams: int = 256
    first_response_wait_s: float = 0.5
    ping_interval_s: float = 5.0
    swap_strategy: str = "load-first"
    drain_timeout_s: float = 60.0
    probe_interval_s: float = 2.0
    graceful_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.swap_strategy not in SWAP_STRATEGIES:
            raise ValueError(f"BFF_SWAP_STRATEGY must be one of {SWAP_STRATEGIES}, got {self.swap_strategy!r}")
        if not self.triton_urls:
            raise ValueError("BFF_TRITON_URLS names no endpoint")
        if self.triton_metrics_urls and len(self.triton_metrics_urls) != len(self.triton_urls):
            raise ValueError("BFF_TRITON_METRICS_URLS must list one URL per Triton endpoint")
        if not self.triton_metrics_urls:
            object.__setattr__(self, "triton_metrics_urls", tuple(_metrics_url(u) for u in self.triton_urls))
        if not 1 <= self.min_answer_tokens <= 4096:
            raise ValueError(f"BFF_MIN_ANSWER_TOKENS must be in [1, 4096], got {self.min_answer_tokens}")
        if self.ping_interval_s <= 0 or self.first_response_wait_s < 0:
            raise ValueError("BFF_PING_INTERVAL_S must be > 0 and BFF_FIRST_RESPONSE_WAIT_S >= 0")
        if not self.api_key and not self.run_open:
            raise ValueError("INTERNAL_API_KEY is not set; set it, or BFF_RUN_OPEN=1 for local development")


def from_env(env: dict[str, str] | None = None, **overrides) -> Settings:
    """Settings from environment variables (os.environ by default); keyword overrides win."""
    env = os.environ if env is None else env
    get = env.get
    values = dict(
        triton_urls=_split(get("BFF_TRITON_URLS", "127.0.0.1:8001")),
        triton_metrics_urls=_split(get("BFF_TRITON_METRICS_URLS", "")),
        api_key=get("INTERNAL_API_KEY") or None,
        run_open=get("BFF_RUN_OPEN", "0").lower() in ("1", "true", "yes"),
        model=get("BFF_MODEL") or None,
        model_repository=get("BFF_MODEL_REPOSITORY", "model_repository"),
        host=get("BFF_HOST", "127.0.0.1"),
        port=int(get("BFF_PORT", "8003")),
        temperature=float(get("BFF_TEMPERATURE", "0.8")),
        top_k=int(get("BFF_TOP_K", "50")),
        max_tokens=int(get("BFF_MAX_TOKENS", "512")),
        min_answer_tokens=int(get("BFF_MIN_ANSWER_TOKENS", str(Settings.min_answer_tokens))),
        max_body_bytes=int(get("BFF_MAX_BODY_BYTES", str(1 << 20))),
        max_streams=int(get("BFF_MAX_STREAMS", "256")),
        first_response_wait_s=float(get("BFF_FIRST_RESPONSE_WAIT_S", "0.5")),
        ping_interval_s=float(get("BFF_PING_INTERVAL_S", "5")),
        swap_strategy=get("BFF_SWAP_STRATEGY", "load-first"),
        drain_timeout_s=float(get("BFF_DRAIN_TIMEOUT_S", "60")),
        probe_interval_s=float(get("BFF_PROBE_INTERVAL_S", "2")),
        graceful_timeout_s=float(get("BFF_GRACEFUL_TIMEOUT_S", "30")),
    )
    values.update(overrides)
    return Settings(**values)
