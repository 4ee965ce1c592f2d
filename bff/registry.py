"""
Which model the BFF serves, what the repository holds, and model swaps. Triton is the only shared state: every
worker and replica serves the model READY there and, when several are, the one the newest swap loaded. Streams
are counted per model here, so a swap drains the old model before it unloads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from pathlib import Path

from backend.protocol import CONFIG_FILE, METADATA_FILE
from backend.protocol import read_metadata as read_version_metadata
from bff.errors import Conflict, NotFound, Unavailable, UpstreamFailed, UpstreamTimeout
from bff.model_control import ModelControl
from bff.settings import Settings
from bff.stats import BffStats
from bff.triton import Endpoint, TritonPool
from bff.triton_metrics import TritonMetrics
from bff.wire import TritonError

log = logging.getLogger("bff.registry")
POLL_S = 0.05
# A swap's wall-clock time, set through the config override of Triton's load call and read back from the model's
# config: "newest" is what Triton says, the same for every worker. The backend ignores parameters it does not know.
EPOCH_PARAMETER = "bff_swap_epoch"


def read_metadata(repository: Path, name: str) -> dict:
    """metadata.json of the newest version folder of a model, or {} if there is none."""
    versions = sorted((p for p in (repository / name).glob(f"*/{METADATA_FILE}") if p.parent.name.isdigit()),
                      key=lambda p: int(p.parent.name))
    if not versions:
        return {}
    try:
        return read_version_metadata(versions[-1].parent)
    except (OSError, ValueError):
        return {}


def epoch_config(repository: Path, name: str, epoch: float) -> str | None:
    """The model's config.pbtxt as the JSON that Triton's load call takes, stamped with a swap's epoch; None
    when the BFF cannot read it (the model then loads as configured, with epoch 0)."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    try:
        config = text_format.Parse((repository / name / CONFIG_FILE).read_text(encoding="utf-8"),
                                   model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as exc:
        log.warning("cannot read %s's %s (%s): loading it without a swap epoch", name, CONFIG_FILE, exc)
        return None
    config.parameters[EPOCH_PARAMETER].string_value = repr(epoch)
    return json_format.MessageToJson(config, preserving_proto_field_name=True)


def epoch_of(config: dict) -> float:
    """The swap epoch in a model config as Triton returns it (JSON); 0 for a model no swap loaded."""
    try:
        return float(config.get("parameters", {}).get(EPOCH_PARAMETER, {}).get("string_value") or 0)
    except (TypeError, ValueError):
        return 0.0


class Registry:
    def __init__(self, settings: Settings, pool: TritonPool, control: ModelControl, metrics: TritonMetrics,
                 stats: BffStats) -> None:
        self.settings = settings
        self.pool = pool
        self.control = control
        self.metrics = metrics
        self.stats = stats
        self.repository = Path(settings.model_repository)
        self.current: str | None = None
        self.blocked = False  # a drain-first swap has stopped admitting new streams
        self._streams: Counter[str] = Counter()  # open streams per model, so a swap can drain the old one
        self.swap_state: dict = {"state": "idle", "from": None, "to": None, "last_error": None,
                                 "last_finished": None}
        self._lock = asyncio.Lock()  # one swap at a time in this process
        self._background: asyncio.Task | None = None
        self.model_ready = False  # the current model READY on every live endpoint, as the last probe saw it
        self._sick: list[str] = []  # endpoints whose current model reports repeated runner failures

    async def start(self) -> None:
        """Adopt what Triton serves; load the configured model if Triton serves nothing."""
        try:
            ready = await self.control.ready_models()
        except TritonError as exc:
            log.warning("Triton not reachable at start (%s); will retry", exc.detail)
            return
        if ready:
            self.current = (await self._winner(ready))[0]
            if self.settings.model not in (None, self.current):
                log.warning("BFF_MODEL=%s is not what Triton serves; serving %s", self.settings.model, self.current)
        elif self.settings.model:
            try:
                # no epoch: loaded at start, like Triton's --load-model, so any deliberate swap outranks it
                await self.control.load(self.settings.model, self.settings.model_load_timeout_s)
                self.current = self.settings.model
            except TritonError as exc:
                log.error("loading %s failed: %s", self.settings.model, exc.detail)
        log.info("current model: %s", self.current)

    async def _winner(self, ready: dict[str, list[Endpoint]]) -> tuple[str, float]:
        """Of the READY models, the one every worker and replica serves, and its epoch: the newest swap's;
        among equals (none was swapped in), the one READY on more endpoints, then BFF_MODEL, then by name."""
        epochs = {name: 0.0 for name in ready}
        if list(ready) != [self.current]:  # else (the steady state) nothing to compare
            names = list(ready)
            configs = await asyncio.gather(*(self.control.config(n, ready[n][0]) for n in names),
                                           return_exceptions=True)
            epochs = {n: 0.0 if isinstance(c, BaseException) else epoch_of(c)
                      for n, c in zip(names, configs, strict=True)}
        name = max(ready, key=lambda n: (epochs[n], len(ready[n]), n == self.settings.model, n))
        return name, epochs[name]

    async def _adopt(self, ready: dict[str, list[Endpoint]]) -> float:
        """Serve what Triton serves (another worker's or replica's swap). A current model that is READY nowhere
        while only unswapped models are (a restarted Triton back with its default) is kept: the probe loads it
        again. Returns the epoch of the model Triton serves (0: none, or no swap loaded it)."""
        if not ready:
            if self.current is None and self.settings.model is not None:
                await self.start()
            return 0.0
        name, epoch = await self._winner(ready)
        if name != self.current and (self.current is None or self.current in ready or epoch > 0):
            log.warning("now serving %s (was %s): what Triton serves", name, self.current)
            self.current = name
        return epoch

    @property
    def swap_bound_s(self) -> float:
        """The longest a swap can take from its epoch to its last unload (two loads or unloads and two drains
        each at their bound, as drain-first does): after it, no swap is still retiring the models beside its own."""
        return 2 * (self.settings.model_load_timeout_s + self.settings.drain_timeout_s)

    async def _unload_strays(self, ready: dict[str, list[Endpoint]], epoch: float) -> None:
        """Models READY beside the served one long after the swap that loaded it (epoch) should have unloaded
        them: its BFF died mid-swap. Unload them, as that swap would have, so they hold no memory for good."""
        if len(ready) < 2 or epoch <= 0 or time.time() - epoch < self.swap_bound_s:
            return
        strays = sorted(m for m in ready if m != self.current)
        log.warning("unloading %s: left beside %s by a swap that did not finish", ", ".join(strays), self.current)
        for model in strays:
            with contextlib.suppress(TritonError):  # another worker's prober may be unloading it too
                await self.control.unload(model, self.settings.model_load_timeout_s)

    async def refresh(self) -> str | None:
        """Re-read from Triton which model to serve (unless a swap here is moving models); the current model."""
        if self.swap_state["state"] == "idle":
            with contextlib.suppress(TritonError):
                await self._adopt(await self.control.ready_models())
        return self.current

    def serving(self) -> str:
        """The model new streams go to, or 503."""
        if self.blocked:
            raise Unavailable("a model swap is in progress", retry_after=5)
        if self.current is None:
            raise Unavailable("no model is loaded", retry_after=5)
        return self.current

    async def probe(self) -> None:
        """The background prober, every probe interval: adopt what Triton serves (unless a swap here is moving
        models), note whether it is READY on every live endpoint, and load it on any endpoint that lacks it
        (a replica that restarted or was added) with the config, and so the epoch, it has elsewhere."""
        try:
            ready = await self.control.ready_models()
        except TritonError:
            self.model_ready = False
            return
        idle = self.swap_state["state"] == "idle"
        if idle:
            await self._unload_strays(ready, await self._adopt(ready))
        current = self.current
        if current in ready and not await self._healthy_somewhere(current, ready[current]):
            self.model_ready = False  # loaded, but failing wherever it is: nothing to reload
            return
        self.model_ready = current in ready and len(ready[current]) == len(self.pool.live())
        if self.model_ready or not idle or current is None:
            return
        if current in ready:
            try:
                config = json.dumps(await self.control.config(current, ready[current][0]))
            except TritonError:
                return
        else:  # READY nowhere (Triton restarted): load it as a swap would, to outrank the default it came back with
            config = epoch_config(self.repository, current, time.time())
        loaded = await self.control.reconcile(current, self.settings.model_load_timeout_s, config)
        if loaded:
            log.warning("loaded %s on %s, which lacked it", current, ", ".join(loaded))
        self.model_ready = await self.control.ready(current)

    async def _healthy_somewhere(self, model: str, endpoints: list[Endpoint]) -> bool:
        """Route around endpoints whose model reports repeated runner failures; False if that is all of them."""
        sick = await self.metrics.unhealthy(model, endpoints)
        for endpoint in sick:
            endpoint.note(model, False)
        urls = sorted(e.url for e in sick)
        if urls != self._sick:
            log.warning("%s failing on %s", model, ", ".join(urls)) if urls else log.warning("%s healthy again", model)
            self._sick = urls
        return len(sick) < len(endpoints)

    @property
    def ready(self) -> bool:
        """Readiness from the last probe: /health must answer at once however busy Triton and the CPU are."""
        return self.model_ready and self.current is not None and not self.blocked

    async def models(self) -> list[dict]:
        """Every model in the repository (Triton's index, else the folder) with its metadata."""
        try:
            states = {m["name"]: m.get("state") for m in await self.control.index()}
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
            await self.refresh()  # another worker or replica may have swapped since the last probe
            if name == self.current:
                return {"status": "unchanged", "current_model": name}
            try:
                known = {m["name"] for m in await self.control.index()}
            except TritonError as exc:
                raise Unavailable(f"Triton is not reachable: {exc.detail}") from None
            if name not in known:
                raise NotFound(f"no model {name!r} in the repository")
            old, config = self.current, epoch_config(self.repository, name, time.time())
            self.swap_state.update(state="loading", to=name, last_error=None, **{"from": old})
            if self.settings.swap_strategy == "drain-first" and old is not None:
                self.blocked = True
                self.swap_state["state"] = "draining"
                self._background = asyncio.create_task(self._drain_then_load(old, name, config))
                return {"status": "draining", "current_model": old}
            try:
                await self.control.load(name, self.settings.model_load_timeout_s, config)
            except TritonError as exc:
                self._finish(f"loading {name} failed: {exc.detail}")
                error = UpstreamTimeout if exc.kind == "timeout" else UpstreamFailed
                raise error(f"loading {name} failed; still serving {old}: {exc.detail}") from None
            newer = None
            with contextlib.suppress(TritonError):  # if Triton cannot say now, the probe converges on its answer
                newer = await self._superseded(name)
            if newer is not None:
                raise Conflict(f"a newer swap to {newer!r} (another worker or replica) won over this one; "
                               f"serving {newer}")
            self.current = name
            self.model_ready = True  # loaded on every live endpoint just now
            self.swap_state["state"] = "draining"
            self._background = asyncio.create_task(self._retire(old))
            return {"status": "draining", "current_model": name}

    async def _superseded(self, name: str) -> str | None:
        """After loading `name`: the model a newer swap elsewhere loaded, if there is one; `name` is then unloaded
        and that one served. None when `name` is the newest."""
        ready = await self.control.ready_models()
        winner, _ = await self._winner(ready) if ready else (name, 0.0)
        if winner == name:
            return None
        await self.control.unload(name, self.settings.model_load_timeout_s)
        self.current = winner
        self._finish(f"swap to {name} superseded by a newer swap to {winner}")
        return winner

    def _finish(self, error: str | None) -> None:
        self.swap_state.update(state="idle", last_error=error, last_finished=time.time())
        self.stats.swap("failed" if error else "ok")
        if error:
            log.error("swap: %s", error)

    def stream_opened(self, model: str) -> None:
        self._streams[model] += 1

    def stream_closed(self, model: str) -> None:
        self._streams[model] -= 1

    async def _drain(self, model: str) -> None:
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self._streams[model] > 0 and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        if self._streams[model]:
            log.warning("swap: %d streams still on %s after the drain bound", self._streams[model], model)

    async def _retire(self, old: str | None) -> None:
        try:
            if old is not None:
                await self._drain(old)
            self.swap_state["state"] = "unloading"
            await self._unload_others()
            self._finish(None)
        except TritonError as exc:
            self._finish(f"unloading {old} failed: {exc.detail}")

    async def _unload_others(self) -> None:
        """Unload every READY model but the one served: the old one, and any that a swap which lost a race
        left behind. Triton lets requests still in flight finish before it releases a model."""
        ready = await self.control.ready_models()
        if ready:
            winner, _ = await self._winner(ready)
            for model in ready:
                if model != winner:
                    await self.control.unload(model, self.settings.model_load_timeout_s)

    async def _gone(self, model: str) -> None:
        """Wait (bounded) until Triton has really released the model, so its memory is free."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while time.monotonic() < deadline:
            states = {m["name"]: m.get("state") for m in await self.control.index()}
            if states.get(model) not in ("READY", "UNLOADING"):
                return
            await asyncio.sleep(POLL_S)

    async def _drain_then_load(self, old: str, name: str, config: str | None) -> None:
        try:
            await self._drain(old)
            self.swap_state["state"] = "unloading"
            await self.control.unload(old, self.settings.model_load_timeout_s)
            await self._gone(old)
            self.swap_state["state"] = "loading"
            try:
                await self.control.load(name, self.settings.model_load_timeout_s, config)
            except TritonError as exc:
                await self.control.load(old, self.settings.model_load_timeout_s)  # put the old model back
                self.model_ready = True
                self._finish(f"loading {name} failed, {old} reloaded: {exc.detail}")
                return
            if await self._superseded(name) is None:
                self.current, self.model_ready = name, True
                await self._unload_others()
                self._finish(None)
        except TritonError as exc:
            self._finish(f"swap to {name} failed: {exc.detail}")
        finally:
            self.blocked = False
