"""
Which model the BFF serves, what the repository holds, and model swaps.

The current model lives in Triton, not here: at start (and whenever it stops being READY, e.g. another
worker swapped it) it is read back from Triton's repository index, so it survives BFF restarts and all
gunicorn workers converge on it. Swaps are serialized by one lock; streams are counted per model so the
old model can be drained before it is unloaded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from pathlib import Path

from backend.protocol import CONFIG_FILE, METADATA_FILE
from bff.errors import NotFound, Unavailable, UpstreamFailed, UpstreamTimeout
from bff.settings import Settings
from bff.stats import BffStats
from bff.triton import TritonError, TritonPool

log = logging.getLogger("bff.registry")
POLL_S = 0.05


def read_metadata(repository: Path, name: str) -> dict:
    """metadata.json of the newest version folder of a model, or {} if there is none."""
    versions = sorted((p for p in (repository / name).glob(f"*/{METADATA_FILE}") if p.parent.name.isdigit()),
                      key=lambda p: int(p.parent.name))
    if not versions:
        return {}
    try:
        return json.loads(versions[-1].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


class Registry:
    def __init__(self, settings: Settings, pool: TritonPool, stats: BffStats) -> None:
        self.settings = settings
        self.pool = pool
        self.stats = stats
        self.repository = Path(settings.model_repository)
        self.current: str | None = None
        self.blocked = False  # a drain-first swap has stopped admitting new streams
        self.streams: Counter[str] = Counter()
        self.swap_state: dict = {"state": "idle", "from": None, "to": None, "last_error": None,
                                 "last_finished": None}
        self._lock = asyncio.Lock()
        self._background: asyncio.Task | None = None
        self.model_ready = False  # the current model READY on every live endpoint, as the last probe saw it

    async def _ready_names(self) -> list[str]:
        return sorted(m["name"] for m in await self.pool.index() if m.get("state") == "READY")

    async def start(self) -> None:
        """Adopt what Triton serves; load the configured model if Triton serves nothing."""
        try:
            ready = await self._ready_names()
        except TritonError as exc:
            log.warning("Triton not reachable at start (%s); will retry", exc.detail)
            return
        wanted = self.settings.model
        if wanted in ready or (ready and wanted is None):
            self.current = wanted or ready[0]
        elif ready:
            self.current = ready[0]
            log.warning("BFF_MODEL=%s is not loaded; serving %s, which Triton has READY", wanted, ready[0])
        elif wanted:
            try:
                await self.pool.load(wanted, self.settings.model_load_timeout_s)
                self.current = wanted
            except TritonError as exc:
                log.error("loading %s failed: %s", wanted, exc.detail)
        log.info("current model: %s", self.current)

    async def _adopt(self) -> None:
        """Re-read the current model from what Triton serves (ours is not READY: a restart, another worker's
        swap)."""
        try:
            ready = await self._ready_names()
        except TritonError:
            return
        if ready and self.current not in ready:
            self.current = ready[0]
        elif self.current is None and self.settings.model is not None:
            await self.start()

    def serving(self) -> str:
        """The model new streams go to, or 503."""
        if self.blocked:
            raise Unavailable("a model swap is in progress", retry_after=5)
        if self.current is None:
            raise Unavailable("no model is loaded", retry_after=5)
        return self.current

    async def probe(self) -> None:
        """The background prober, every probe interval: is the current model READY on every live endpoint? If
        not, and no swap is moving models, adopt what Triton serves and load it on any endpoint that lacks it."""
        self.model_ready = self.current is not None and await self.pool.ready(self.current)
        if self.model_ready or self.swap_state["state"] != "idle":
            return
        await self._adopt()
        if self.current is not None:
            loaded = await self.pool.reconcile(self.current, self.settings.model_load_timeout_s)
            if loaded:
                log.warning("loaded %s on %s, which lacked it", self.current, ", ".join(loaded))
            self.model_ready = await self.pool.ready(self.current)

    @property
    def ready(self) -> bool:
        """Readiness from the last probe: /health must answer at once however busy Triton and the CPU are."""
        return self.model_ready and self.current is not None and not self.blocked

    async def models(self) -> list[dict]:
        """Every model in the repository (Triton's index, else the folder) with its metadata."""
        try:
            states = {m["name"]: m.get("state") for m in await self.pool.index()}
        except TritonError:
            states = {}
        names = set(states)
        if self.repository.is_dir():
            names |= {p.name for p in self.repository.iterdir() if (p / CONFIG_FILE).is_file()}
        out = []
        for name in sorted(names):
            meta = read_metadata(self.repository, name)
            out.append({
                "model_tag": name,
                "source": str(meta.get("source") or "unknown"),
                "path": str(meta.get("checkpoint_path") or (self.repository / name).resolve()),
                "loaded": states.get(name) == "READY",
            })
        return out

    async def swap(self, name: str) -> dict:
        """Start a swap to `name`; see the /models/swap description in bff/openapi.yaml."""
        async with self._lock:
            if self._background is not None:
                await self._background  # the previous swap's drain/unload
            if name == self.current:
                return {"status": "unchanged", "current_model": name}
            try:
                known = {m["name"] for m in await self.pool.index()}
            except TritonError as exc:
                raise Unavailable(f"Triton is not reachable: {exc.detail}") from None
            if name not in known:
                raise NotFound(f"no model {name!r} in the repository")
            old = self.current
            self.swap_state.update(state="loading", to=name, last_error=None, **{"from": old})
            if self.settings.swap_strategy == "drain-first" and old is not None:
                self.blocked = True
                self.swap_state["state"] = "draining"
                self._background = asyncio.create_task(self._drain_then_load(old, name))
                return {"status": "draining", "current_model": old}
            try:
                await self.pool.load(name, self.settings.model_load_timeout_s)
            except TritonError as exc:
                self._finish(f"loading {name} failed: {exc.detail}")
                error = UpstreamTimeout if exc.kind == "timeout" else UpstreamFailed
                raise error(f"loading {name} failed; still serving {old}: {exc.detail}") from None
            self.current = name
            self.model_ready = True  # loaded on every live endpoint just now
            self.swap_state["state"] = "draining"
            self._background = asyncio.create_task(self._retire(old))
            return {"status": "draining", "current_model": name}

    def _finish(self, error: str | None) -> None:
        self.swap_state.update(state="idle", last_error=error, last_finished=time.time())
        self.stats.swap("failed" if error else "ok")
        if error:
            log.error("swap: %s", error)

    async def _drain(self, model: str) -> None:
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self.streams[model] > 0 and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        if self.streams[model]:
            log.warning("swap: %d streams still on %s after the drain bound", self.streams[model], model)

    async def _retire(self, old: str | None) -> None:
        try:
            if old is not None:
                await self._drain(old)
                self.swap_state["state"] = "unloading"
                # Triton lets requests still in flight finish before it releases the model.
                await self.pool.unload(old, self.settings.model_load_timeout_s)
            self._finish(None)
        except TritonError as exc:
            self._finish(f"unloading {old} failed: {exc.detail}")

    async def _gone(self, model: str) -> None:
        """Wait (bounded) until Triton has really released the model, so its memory is free."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while time.monotonic() < deadline:
            states = {m["name"]: m.get("state") for m in await self.pool.index()}
            if states.get(model) not in ("READY", "UNLOADING"):
                return
            await asyncio.sleep(POLL_S)

    async def _drain_then_load(self, old: str, name: str) -> None:
        try:
            await self._drain(old)
            self.swap_state["state"] = "unloading"
            await self.pool.unload(old, self.settings.model_load_timeout_s)
            await self._gone(old)
            self.swap_state["state"] = "loading"
            try:
                await self.pool.load(name, self.settings.model_load_timeout_s)
                self.current, self.model_ready = name, True
                self._finish(None)
            except TritonError as exc:
                await self.pool.load(old, self.settings.model_load_timeout_s)  # put the old model back
                self.model_ready = True
                self._finish(f"loading {name} failed, {old} reloaded: {exc.detail}")
        except TritonError as exc:
            self._finish(f"swap to {name} failed: {exc.detail}")
        finally:
            self.blocked = False
