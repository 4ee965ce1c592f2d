"""
Fixtures of the in-process tier: a FakePool serving "head" with "orig" and "demo" beside it in the repository,
and a client of the app over it (tests/bff/inprocess/client.py).
"""

from __future__ import annotations

import pytest

from tests.bff.inprocess.client import Bff
from tests.support.fake_triton import FakePool


@pytest.fixture
def pool() -> FakePool:
    return FakePool(served=("head",), others=("orig", "demo"))


@pytest.fixture
def bff(pool, tmp_path) -> Bff:
    return Bff(pool, tmp_path)
