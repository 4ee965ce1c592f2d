"""
Every setting of the BFF, read once from environment variables into one frozen object that the app,
gunicorn's config (bff/gunicorn_conf.py) and `make serve` (tools/serve.py) all use. Each field
(core/config_fields.py's) says its environment variable, default, range and meaning; `python -m bff.settings`
prints the table.

The generation defaults are the Triton model's own (backend/protocol.py), so a request without them gets
what a direct Triton client gets.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from backend.protocol import INPUT
from core.config_fields import check, parse, setting

SWAP_STRATEGIES = ("load-first", "drain-first")
MIN_KEY_CHARS = 16
CGROUP_ROOT = "/sys/fs/cgroup"
# the default worker count's ceiling when no CPU quota bounds it: each worker costs ~75 MB and probes every Triton
# endpoint, and one event loop relays hundreds of streams, so more workers on a big node only risk the pod's OOM
MAX_DEFAULT_WORKERS = 8
# prometheus_client's multiprocess switch: gunicorn_conf sets it before any worker imports prometheus_client
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class MissingKey(ValueError):
    """No INTERNAL_API_KEY and not BFF_RUN_OPEN: the BFF never serves open by accident."""


def _metrics_url(grpc_url: str) -> str:
    # Triton's default ports are grpc 8001 / metrics 8002; anything else must be given explicitly.
    host = urlsplit("//" + grpc_url).hostname or "127.0.0.1"
    return f"http://{host}:8002/metrics"


def cpu_quota(root: str = CGROUP_ROOT) -> int | None:
    """The CPUs this container's quota allows, rounded up and at least 1 (cgroup v2 `cpu.max`, else v1's CFS
    files); None without a quota."""
    try:
        quota, period = Path(root, "cpu.max").read_text().split()
    except OSError:
        try:
            quota, period = (Path(root, "cpu", f"cpu.cfs_{n}_us").read_text().strip() for n in ("quota", "period"))
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def _bounds(name: str) -> dict:
    """The model's own range of a generation input (backend/protocol.py): a default outside it would be refused."""
    return {"low": INPUT[name].low, "high": INPUT[name].high}


@dataclass(frozen=True)
class Settings:
    triton_urls: tuple[str, ...] = setting(("127.0.0.1:8001",), "Triton gRPC endpoints, comma separated "
                                           "(host:port)", env="BFF_TRITON_URLS")
    triton_metrics_urls: tuple[str, ...] = setting((), "Triton /metrics URLs, same order (default "
                                                   "http://host:8002/metrics)", env="BFF_TRITON_METRICS_URLS")
    api_key: str | None = setting(None, "shared secret expected in X-Internal-API-Key (required unless "
                                        "BFF_RUN_OPEN=1)", env="INTERNAL_API_KEY")
    triton_admin_key: str | None = setting(None, "key for Triton's restricted repository API (sent as the "
                                                 "triton-admin-key header)", env="BFF_TRITON_ADMIN_KEY")
    metrics_open: bool = setting(False, "1 = /metrics needs no key (for a Prometheus scraper that reaches the BFF "
                                        "only inside the cluster)", env="BFF_METRICS_OPEN")
    run_open: bool = setting(False, "1 = serve without a key (local development only)", env="BFF_RUN_OPEN")
    model: str | None = setting(None, "model to serve when Triton has none loaded", env="BFF_MODEL")
    model_repository: str = setting("model_repository", "model repository, for metadata.json",
                                    env="BFF_MODEL_REPOSITORY")
    host: str = setting("127.0.0.1", "listen address", env="BFF_HOST")
    port: int = setting(8003, "listen port", env="BFF_PORT")
    workers: int = setting(0, f"gunicorn workers (0: one per CPU of the container's quota, else of the CPUs this "
                              f"process may use, at most {MAX_DEFAULT_WORKERS})", low=0, env="BFF_WORKERS")
    temperature: float = setting(INPUT["temperature"].default, "generation default", **_bounds("temperature"),
                                 env="BFF_TEMPERATURE")
    top_k: int = setting(INPUT["top_k"].default, "generation default", **_bounds("top_k"), env="BFF_TOP_K")
    max_tokens: int = setting(INPUT["max_tokens"].default, "generation default", **_bounds("max_tokens"),
                              env="BFF_MAX_TOKENS")
    min_answer_tokens: int = setting(128, "a history longer than the context loses its oldest turns until "
                                          "min(max_tokens, this) tokens of answer fit",
                                     **_bounds("min_answer_tokens"), env="BFF_MIN_ANSWER_TOKENS")
    max_body_bytes: int = setting(1 << 20, "request body bound (413 above it)", env="BFF_MAX_BODY_BYTES")
    max_streams: int = setting(256, "concurrent streams per process (503 above it)", env="BFF_MAX_STREAMS")
    first_response_wait_s: float = setting(0.5, "how long /generate waits for Triton's first answer before "
                                                "committing the 200", low=0, env="BFF_FIRST_RESPONSE_WAIT_S")
    ping_interval_s: float = setting(5.0, "`: ping` comment after this long without a token",
                                     env="BFF_PING_INTERVAL_S")
    stream_silence_s: float = setting(300.0, "a stream whose Triton request has not answered for this long ends "
                                             "with an error event and is cancelled", env="BFF_STREAM_SILENCE_S")
    model_load_timeout_s: float = setting(600.0, "bound on one model load or unload call to Triton (504 past it)",
                                          env="BFF_MODEL_LOAD_TIMEOUT_S")
    swap_strategy: str = setting("load-first", "load-first (both models fit) or drain-first",
                                 choices=SWAP_STRATEGIES, env="BFF_SWAP_STRATEGY")
    drain_timeout_s: float = setting(60.0, "bound on waiting for old streams during a swap",
                                     env="BFF_DRAIN_TIMEOUT_S")
    probe_interval_s: float = setting(2.0, "endpoint health probe period", env="BFF_PROBE_INTERVAL_S")
    graceful_timeout_s: float = setting(30.0, "uvicorn's timeout_graceful_shutdown (gunicorn's bound is 5 s "
                                              "longer)", env="BFF_GRACEFUL_TIMEOUT_S")

    def __post_init__(self) -> None:
        check(self)  # each field's range or choices
        if not self.triton_urls:
            raise ValueError("BFF_TRITON_URLS names no endpoint")
        if self.triton_metrics_urls and len(self.triton_metrics_urls) != len(self.triton_urls):
            raise ValueError("BFF_TRITON_METRICS_URLS must list one URL per Triton endpoint")
        if not self.triton_metrics_urls:
            object.__setattr__(self, "triton_metrics_urls", tuple(_metrics_url(u) for u in self.triton_urls))
        # bounds open at 0 and between two fields: past what one field's inclusive range says
        if self.ping_interval_s <= 0 or self.model_load_timeout_s <= 0:
            raise ValueError("BFF_PING_INTERVAL_S and BFF_MODEL_LOAD_TIMEOUT_S must be > 0")
        if self.stream_silence_s < self.ping_interval_s:
            raise ValueError("BFF_STREAM_SILENCE_S must be at least BFF_PING_INTERVAL_S")
        if not self.api_key and not self.run_open:
            raise MissingKey("INTERNAL_API_KEY is not set; set it, or BFF_RUN_OPEN=1 for local development")
        if self.api_key and self.run_open:
            raise ValueError("BFF_RUN_OPEN=1 would serve without checking the INTERNAL_API_KEY that is set; "
                             "unset one of them")
        if self.api_key and len(self.api_key) < MIN_KEY_CHARS:
            raise ValueError(f"INTERNAL_API_KEY must be at least {MIN_KEY_CHARS} characters")

    def worker_count(self, cgroup_root: str = CGROUP_ROOT) -> int:
        # a Burstable pod's affinity mask is every CPU of the node: the quota says what it may really use
        cpus = cpu_quota(cgroup_root) or len(os.sched_getaffinity(0))
        return self.workers or min(cpus, MAX_DEFAULT_WORKERS)


def from_env(env: dict[str, str] | None = None, **overrides) -> Settings:
    """Settings from environment variables (os.environ by default); keyword overrides win."""
    env = os.environ if env is None else env
    values = {f.name: parse(Settings, f, env[f.metadata["env"]], f.metadata["env"])
              for f in dataclasses.fields(Settings) if env.get(f.metadata["env"])}
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
