"""
The BFF app in-process: create_app over a FakePool (tests/support/fake_triton.py). falcon.testing's
ASGIConductor runs the app's lifespan (the registry adopts what the fake serves, as it adopts what Triton
serves) and httpx's ASGI transport sends each request, reading a stream to its end as a client that stays
does (falcon's simulated requests disconnect at once, which ends a stream at its first pause).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import falcon.asgi
import falcon.testing
import httpx
import orjson

from bff.app import create_app
from bff.settings import Settings, from_env
from tests.bff.bffkit import AUTH, KEY
from tests.support.fake_triton import FakePool, repository


def make_app(pool: FakePool, settings: Settings) -> falcon.asgi.App:
    """The app as servers build it, with the fake for a pool."""
    return create_app(settings, pool_factory=lambda _: pool)


class Bff:
    """A synchronous client of the app over `pool`, a repository in `folder` and Settings `overrides`: each request
    runs in the app's lifespan, in an event loop of its own."""

    def __init__(self, pool: FakePool, folder: Path, **overrides) -> None:
        self.pool = pool
        self.settings = from_env({}, **{"api_key": KEY, "model_repository": str(repository(folder, pool.states)),
                                        **overrides})
        self.app = make_app(pool, self.settings)

    def request(self, method: str, path: str, headers: dict | None = AUTH, **kwargs) -> httpx.Response:
        async def send() -> httpx.Response:
            async with falcon.testing.ASGIConductor(self.app), self.http() as http:
                return await http.request(method, path, headers=headers, **kwargs)

        return asyncio.run(send())

    def http(self) -> httpx.AsyncClient:
        """An httpx client of the app (inside a running lifespan: `async with ASGIConductor(app)`)."""
        return httpx.AsyncClient(transport=httpx.ASGITransport(self.app), base_url="http://bff")

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
