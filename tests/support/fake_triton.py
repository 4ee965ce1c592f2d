"""
Triton without Triton, for the BFF's in-process tier: `create_app(settings, connect=fake_connect(pool))` with a
FakePool, which answers from scripts in microseconds as the pool, the repository control and the metrics scrape.
It keeps every stream's inputs as Triton would receive them, so a test sees what the BFF sent, and refuses inputs
the backend would refuse: a fake that accepts more hides a BFF bug.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import orjson

from backend.protocol import CONFIG_FILE, INPUT, MAX_STOP_CHARS, MAX_STOPS
from bff.app import Triton
from bff.generation_params import GenerationParams
from bff.settings import Settings
from bff.wire import Piece, TritonError, request_message

URL = "fake-triton:8001"
# A script item: one wait for a response that passes without one (the BFF then pings, or gives up on Triton).
SILENT = "silent"
KINDS = ("invalid", "busy", "no_model", "down", "failed", "timeout")  # what a TritonError's kind may be


def answer(*texts: str, finish: str = "stop", gpu: int = 0, prompt_tokens: int = 7,
           dropped_turns: int = 0) -> list[Piece]:
    """A whole answer: a piece per text, then the backend's final response with its usage."""
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(texts), "dropped_turns": dropped_turns}
    return [*(Piece(t, gpu, "", final=False, usage={}) for t in texts), Piece("", gpu, finish, final=True, usage=usage)]


def repository(folder: Path, names: Iterable[str]) -> Path:
    """A model repository the BFF can read beside the fake: a config.pbtxt per model (a swap stamps its epoch)."""
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / CONFIG_FILE).write_text(f'name: "{name}"\n', encoding="utf-8")
    return folder


class FakeEndpoint:
    def __init__(self, url: str) -> None:
        self.url = url
        self.up = True
        self.active = 0
        self.opened = 0
        self.serving: set[str] = set()

    def serves(self, models: Iterable[str]) -> None:
        self.serving = set(models)

    def note(self, model: str, ready: bool) -> None:
        (self.serving.add if ready else self.serving.discard)(model)


class FakeStream:
    """One generation that plays its script: Pieces, TritonErrors (raised), SILENT waits and asyncio.Events (silent
    until the test sets one). Past its final piece it ends; a script that runs out before one stays silent forever,
    as a hung Triton does."""

    def __init__(self, endpoint: FakeEndpoint, model: str, script: list) -> None:
        self.endpoint, self.model, self.script = endpoint, model, list(script)
        self.ended = False  # past the final piece
        self.closed = False  # the BFF released it (cancelled, if it was still running)
        endpoint.active += 1
        endpoint.opened += 1

    async def next(self, timeout: float | None = None) -> Piece | None:
        if self.ended:
            return None
        item = self.script.pop(0) if self.script else SILENT
        if item is SILENT:
            await asyncio.sleep(timeout or 0)
            raise TimeoutError
        if isinstance(item, asyncio.Event):
            if not item.is_set():
                self.script.insert(0, item)  # still held: the next wait waits on it again
                async with asyncio.timeout(timeout):
                    await item.wait()
            self.script.remove(item)
            return await self.next(timeout)
        if isinstance(item, TritonError):
            raise item
        self.ended = item.final
        return item

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.endpoint.active -= 1


class FakePool:
    """One endpoint serving `served` (READY) out of a repository that also holds `others`. `scripts` are the
    answers of the streams opened next, in order; once they run out each stream gets `default`."""

    def __init__(self, served: Iterable[str] = ("head",), others: Iterable[str] = ()) -> None:
        self.endpoints = [FakeEndpoint(URL)]
        self.states = {**dict.fromkeys(others, "UNAVAILABLE"), **dict.fromkeys(served, "READY")}
        self.configs: dict[str, dict] = {}  # as each model was loaded (a swap's epoch is in it)
        self.broken: set[str] = set()  # models whose load fails, as a model with a bad graph does
        self.scripts: list[list] = []
        self.default = answer("Hello", " world")
        self.opened: list[dict] = []  # each stream's inputs, its messages decoded
        self.streams: list[FakeStream] = []
        self.metrics = ""  # the Prometheus text every endpoint's /metrics answers

    def live(self) -> list[FakeEndpoint]:
        return [e for e in self.endpoints if e.up]

    def pick(self, model: str, exclude: tuple = ()) -> FakeEndpoint | None:
        return next((e for e in self.endpoints if e not in exclude), None)

    def open(self, endpoint: FakeEndpoint, model: str, request_id: str, params: GenerationParams) -> FakeStream:
        request_message(model, request_id, params)  # the inputs are ones the wire encoding takes
        inputs = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name != "messages"}
        inputs["stop"] = list(params.stop)  # a BYTES tensor of one element per string
        for name, value in inputs.items():
            if name == "stop":
                continue
            spec = INPUT[name]
            assert value is None or spec.low is None or spec.low <= value <= spec.high, f"{name}={value!r}"
        stop = inputs.get("stop") or ()
        assert len(stop) <= MAX_STOPS and all(len(s) <= MAX_STOP_CHARS for s in stop), stop
        self.opened.append({"model": model, "request_id": request_id, **inputs,
                            "messages": orjson.loads(params.messages)})
        script = self.scripts.pop(0) if self.scripts else self.default
        if self.states.get(model) != "READY":  # as Triton answers a request for a model it does not serve
            script = [TritonError("no_model", f"Request for unknown model: '{model}' is not found")]
        stream = FakeStream(endpoint, model, script)
        self.streams.append(stream)
        return stream

    async def probe(self) -> None:
        pass

    async def index(self) -> list[dict]:
        return [{"name": name, "state": state} for name, state in self.states.items()]

    async def ready_models(self) -> dict[str, list[FakeEndpoint]]:
        for endpoint in self.live():
            endpoint.serves(n for n, s in self.states.items() if s == "READY")
        return {name: self.live() for name, state in self.states.items() if state == "READY"}

    async def config(self, model: str, endpoint: FakeEndpoint) -> dict:
        return self.configs.get(model, {})

    async def ready(self, model: str) -> bool:
        return self.states.get(model) == "READY"

    async def reconcile(self, model: str, timeout_s: float, config: str | None = None) -> list[str]:
        return []

    async def load(self, model: str, timeout_s: float, config: str | None = None) -> None:
        if model not in self.states:
            raise TritonError("failed", f"failed to load '{model}', no version is available")
        if model in self.broken:
            raise TritonError("failed", f"failed to load '{model}': the graph does not parse")
        self.states[model] = "READY"
        self.configs[model] = json.loads(config) if config else {}

    async def unload(self, model: str, timeout_s: float) -> None:
        self.states[model] = "UNAVAILABLE"

    async def unhealthy(self, model: str, endpoints: list) -> list:
        return []

    async def statistics(self) -> dict[str, list]:
        return {e.url: [] for e in self.live()}

    async def text(self, endpoints: list | None = None) -> dict[str, str]:
        return {e.url: self.metrics for e in (self.live() if endpoints is None else endpoints)}

    async def close(self) -> None:
        pass


def fake_connect(pool: FakePool) -> Callable[[Settings], Triton]:
    """create_app's `connect` for the fake: it is the pool, the repository control and the metrics scrape."""
    return lambda settings: Triton(pool, pool, pool)
