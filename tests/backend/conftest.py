"""Fixtures for the backend's unit tests: a tiny random G4 demo model and its tokenizer, and loopback HTTP servers
for the tools."""

from __future__ import annotations

import socket

import pytest

from core.checkpoint import find_checkpoint, open_checkpoint
from core.gpt import build_gpt
from core.random_checkpoint import make_checkpoint
from tests.support.httpkit import LoopbackServer
from tests.support.schedkit import MAX_SEQ


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    make_checkpoint(base, "G4", depth=2, n_embd=64, sequence_len=MAX_SEQ)
    loaded, tok = open_checkpoint(find_checkpoint("sft", nanochat_base=base))
    return build_gpt(loaded.config, loaded.state_dict), tok


@pytest.fixture
def server():
    srv = LoopbackServer()
    yield srv
    srv.close()


@pytest.fixture
def silent_port():
    """A port that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock.getsockname()[1]
    sock.close()
