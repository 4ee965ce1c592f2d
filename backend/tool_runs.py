"""
Runs the registry channel's tool calls (core/tool_calls.py) off the step thread, in a small pool with a deadline:
a row waits for its result while the others decode, and a call that hangs ends as a failed result ("timed out"),
never as a failed request. A finished call wakes the step thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from backend import web_search
from core.calculator_tool import calculator
from core.tool_calls import ToolCall, ToolError, ToolRegistry, ToolResult

WORKERS = 8  # calls in flight at once; more wait for a worker, their deadline running


def registry_from_env(timeout_s: float, environ: Mapping[str, str] = os.environ) -> ToolRegistry:
    """The tools a registry-channel model may call; web_search is bounded by timeout_s per HTTP call."""
    search = web_search.from_env(environ, timeout_s=timeout_s)
    return ToolRegistry({"calculator": calculator, "web_search": search or _no_search})


def _no_search(arguments: dict) -> object:
    raise ToolError(web_search.NO_BACKEND)


@dataclass(eq=False)
class Run:
    call: ToolCall
    future: Future
    deadline: float  # monotonic


class ToolRuns:
    def __init__(self, registry: ToolRegistry, timeout_s: float, wake: Callable[[], None] = lambda: None) -> None:
        self.registry, self.timeout_s, self.wake = registry, timeout_s, wake
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @property
    def searches(self) -> bool:
        """Whether web_search has a backend (a forced search without one is skipped)."""
        return self.registry.tools.get("web_search") is not _no_search

    def start(self, call: ToolCall) -> Run:
        with self._lock:  # the pool's threads start with the first call: models without tools never have them
            if self._pool is None:
                self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="nanochat-tool")
        future = self._pool.submit(self.registry.execute, call)
        future.add_done_callback(lambda _: self.wake())
        return Run(call, future, time.monotonic() + self.timeout_s)

    def result(self, run: Run, now: float) -> ToolResult | None:
        """The call's result once it is done or past its deadline; None while it runs."""
        if run.future.done():
            return run.future.result()  # execute() never raises
        if now >= run.deadline:
            run.future.cancel()  # a call still queued never runs; a running one ends by its own HTTP timeout
            return ToolResult(run.call.tool, False, error=f"{run.call.tool} timed out after {self.timeout_s:g} s")
        return None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
