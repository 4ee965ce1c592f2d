"""The local Triton launcher leaves nothing running, also when the server dies under it."""

import os

import psutil
import pytest

from tools.local_triton import LocalTriton, session_members

pytestmark = pytest.mark.triton


def test_a_crashed_server_leaves_no_backend_stubs(oracle_repository):
    with LocalTriton(oracle_repository, load=["demo"]) as server:  # stops it also when an assert fails
        sid = server.process.pid  # the server leads its own session; its backend stubs are in it
        assert len(session_members(sid)) >= 2, "expected the server and the model's backend stub"
        server.process.kill()  # as a crash would: the stub outlives its server
        server.process.wait()
        server.stop()
        assert session_members(sid) == []


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning to a subset needs two CPUs")
def test_cpus_and_priority_hold_the_server_and_its_stubs(oracle_repository):
    cpu = min(os.sched_getaffinity(0))
    with LocalTriton(oracle_repository, load=["demo"], cpus={cpu}, priority="idle") as server:
        pids = session_members(server.process.pid)
        assert len(pids) >= 2, "expected the server and the model's backend stub"
        threads = [t.id for pid in pids for t in psutil.Process(pid).threads()]
        assert {tid: os.sched_getaffinity(tid) for tid in threads} == {tid: {cpu} for tid in threads}
        assert {tid: os.sched_getscheduler(tid) for tid in threads} == {tid: os.SCHED_IDLE for tid in threads}
    assert os.sched_getaffinity(0) != {cpu}, "the caller itself keeps its CPUs"
    assert os.sched_getscheduler(0) == os.SCHED_OTHER, "... and its priority"


def test_an_unknown_priority_is_refused(oracle_repository):
    with pytest.raises(ValueError, match="priority must be one of"):
        LocalTriton(oracle_repository, priority="high")
