"""
BFF fixtures: the live BFF in front of the session's real Triton server (tests/conftest.py).
"""

from __future__ import annotations

import pytest

from tools.bff_client import run_bff, triton_settings


@pytest.fixture(scope="session")
def bff_url(triton_server):
    """The BFF in front of the shared Triton server, serving the head oracle."""
    with run_bff(**triton_settings(triton_server, model="head")) as url:
        yield url
