"""
The BFF app in-process: create_app over a FakePool (tests/support/fake_triton.py). falcon.testing's
ASGIConductor runs the app's lifespan (the registry adopts what the fake serves, as it adopts what Triton
serves) and httpx's ASGI transport sends each request, reading a stream to its end as a client that stays
does (falcon's simulated requests disconnect at once, which ends a stream at its first pause).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import falcon.testing
import httpx
import orjson

from bff.app import create_app
from bff.settings import from_env
from tests.support.fake_triton import FakePool, fake_connect, repository
from tools.bff_client import AUTH, KEY
from tools.measure import SERVER_TIMEOUT_S

BASE_URL = "http://bff"
T = TypeVar("T")


class Bff:
    """A synchronous client of the app over `pool`, a repository in `folder` and Settings `overrides`: each request
    runs in the app's lifespan, in an event loop of its own."""

    def __init__(self, pool: FakePool, folder: Path, **overrides) -> None:
        self.pool = pool
        self.settings = from_env({}, **{"api_key": KEY, "model_repository": str(repository(folder, pool.states)),
                                        **overrides})
        self.app = create_app(self.settings, connect=fake_connect(pool))  # the app as servers build it

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[httpx.AsyncClient]:
        """An httpx client of the app, inside the app's lifespan (its registry and prober live as long)."""
        async with falcon.testing.ASGIConductor(self.app), \
                httpx.AsyncClient(transport=httpx.ASGITransport(self.app), base_url=BASE_URL,
                                  timeout=SERVER_TIMEOUT_S) as http:
            yield http

    def call(self, work: Callable[[httpx.AsyncClient], Awaitable[T]]) -> T:
        """What `work` gives with an httpx client of the app, run inside the app's lifespan."""
        async def run() -> T:
            async with self.session() as http:
                return await work(http)

        return asyncio.run(run())

    def request(self, method: str, path: str, headers: dict | None = AUTH, **kwargs) -> httpx.Response:
        return self.call(lambda http: http.request(method, path, headers=headers, **kwargs))

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: object = None, **kwargs) -> httpx.Response:
        return self.request("POST", path, json=body, **kwargs) if body is not None \
            else self.request("POST", path, **kwargs)


def events(body: str) -> list:
    """An SSE body's events in order: each `data:` line's JSON (`[DONE]` as that string), "ping" for a comment.
    Asserts the framing: an event is one line, then a blank one."""
    blocks = body.split("\n\n")
    assert blocks[-1] == "", body[-200:]
    out = []
    for block in blocks[:-1]:
        assert "\n" not in block, block
        if block == ": ping":
            out.append("ping")
        else:
            assert block.startswith("data: "), block
            data = block.removeprefix("data: ")
            out.append(data if data == "[DONE]" else orjson.loads(data))
    return out
