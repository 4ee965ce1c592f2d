"""
Triton's model repository, as the BFF controls it: which models are READY where, their configs, loading and
unloading on every live endpoint, and the inference statistics. Only the BFF holds the admin key that
Triton's restricted repository API asks for, so these calls go through here.
"""

from __future__ import annotations

import asyncio
import logging

from tritonclient.utils import InferenceServerException

from bff.triton import PROBE_TIMEOUT_S, Endpoint, TritonPool
from bff.wire import NoEndpoint, TritonError

log = logging.getLogger("bff.triton")
ADMIN_HEADER = "triton-admin-key"  # the header Triton's restricted repository API checks (docker/, k8s)


class ModelControl:
    """Repository calls on a pool's live endpoints; each notes on the endpoints what they serve."""

    def __init__(self, pool: TritonPool, admin_key: str | None = None) -> None:
        self.pool = pool
        # Triton started with --grpc-restricted-protocol=model-repository:<ADMIN_HEADER>=<key> answers the
        # repository API (index, load, unload) only to calls that carry the key: only the BFF has it. Over
        # gRPC Triton reads it from the metadata key prefixed "triton-grpc-protocol-".
        self.admin = {f"triton-grpc-protocol-{ADMIN_HEADER}": admin_key} if admin_key else None

    async def _each_live(self, call) -> list:
        live = self.pool.live()
        if not live:
            raise NoEndpoint()
        results = await asyncio.gather(*(call(e.client) for e in live), return_exceptions=True)
        for endpoint, result in zip(live, results, strict=True):
            if isinstance(result, InferenceServerException) and "UNAVAILABLE" in str(result.status()):
                endpoint.mark(False, result.message())
        for result in results:
            if isinstance(result, InferenceServerException):
                timed_out = "DEADLINE_EXCEEDED" in str(result.status()) or "Deadline Exceeded" in result.message()
                raise TritonError("timeout" if timed_out else "failed", result.message())
            if isinstance(result, Exception):
                raise result
        return results

    async def index(self) -> list[dict]:
        """Triton's repository index (name, state, reason) from the first live endpoint."""
        for endpoint in self.pool.live():
            try:
                index = await endpoint.client.get_model_repository_index(
                    headers=self.admin, as_json=True, client_timeout=PROBE_TIMEOUT_S * 5)
                return index.get("models", [])
            except InferenceServerException as exc:
                endpoint.mark(False, f"repository index: {exc.message()}")
        raise NoEndpoint()

    async def ready_models(self) -> dict[str, list[Endpoint]]:
        """Each model READY on a live endpoint -> those endpoints, from every live endpoint's repository index;
        notes on each endpoint what it serves."""
        live = self.pool.live()
        indexes = await self._each_live(lambda c: c.get_model_repository_index(
            headers=self.admin, as_json=True, client_timeout=PROBE_TIMEOUT_S))
        out: dict[str, list[Endpoint]] = {}
        for endpoint, index in zip(live, indexes, strict=True):
            endpoint.serves(m["name"] for m in index.get("models", []) if m.get("state") == "READY")
            for name in endpoint.serving:
                out.setdefault(name, []).append(endpoint)
        return out

    async def config(self, model: str, endpoint: Endpoint) -> dict:
        """The model's config as `endpoint` loaded it (JSON)."""
        try:
            answer = await endpoint.client.get_model_config(model, as_json=True, client_timeout=PROBE_TIMEOUT_S)
        except InferenceServerException as exc:
            raise TritonError("failed", exc.message()) from None
        return answer.get("config", {})

    async def ready(self, model: str) -> bool:
        """True when the model is READY on every live endpoint; notes on each which serve it."""
        live = self.pool.live()
        try:
            states = await self._each_live(lambda c: c.is_model_ready(model, client_timeout=PROBE_TIMEOUT_S))
        except TritonError:
            return False
        for endpoint, state in zip(live, states, strict=True):
            endpoint.note(model, bool(state))
        return all(states)

    async def reconcile(self, model: str, timeout_s: float, config: str | None = None) -> list[str]:
        """Load `model` (with `config`, the JSON of Triton's config override) on every live endpoint that lacks
        it (a replica that restarted or was added comes back with only its default model); the URLs it loaded
        it on. Failures wait for the next probe."""
        loaded = []
        for endpoint in self.pool.live():
            if model in endpoint.serving:
                continue
            try:
                if not await endpoint.client.is_model_ready(model, client_timeout=PROBE_TIMEOUT_S):
                    await endpoint.client.load_model(model, headers=self.admin, config=config,
                                                     client_timeout=timeout_s)
                    loaded.append(endpoint.url)
                endpoint.note(model, True)
            except InferenceServerException as exc:
                log.warning("loading %s on %s failed: %s", model, endpoint.url, exc.message())
        return loaded

    async def load(self, model: str, timeout_s: float, config: str | None = None) -> None:
        """Load on every live endpoint (with `config`, the JSON of Triton's config override); returns when
        loaded, raises TritonError with Triton's reason (kind timeout past timeout_s)."""
        await self._each_live(lambda c: c.load_model(model, headers=self.admin, config=config,
                                                      client_timeout=timeout_s))

    async def unload(self, model: str, timeout_s: float) -> None:
        """Ask every live endpoint to unload (Triton finishes in-flight requests first, asynchronously)."""
        await self._each_live(lambda c: c.unload_model(model, headers=self.admin, client_timeout=timeout_s))

    async def statistics(self) -> dict[str, list]:
        """Triton's per-model inference statistics, per endpoint."""
        out = {}
        for endpoint in self.pool.live():
            try:
                stats = await endpoint.client.get_inference_statistics(as_json=True,
                                                                        client_timeout=PROBE_TIMEOUT_S)
                out[endpoint.url] = stats.get("model_stats", [])
            except InferenceServerException as exc:
                out[endpoint.url] = [{"error": exc.message()}]
        return out
