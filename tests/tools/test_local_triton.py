"""The local Triton launcher leaves nothing running, also when the server dies under it."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tools.local_triton import LocalTriton, session_members
from tools.paths import PROJECT

pytestmark = pytest.mark.triton


def test_a_crashed_server_leaves_no_backend_stubs_and_no_shared_memory(oracle_repository):
    with LocalTriton(oracle_repository, load=["demo"]) as server:  # stops it also when an assert fails
        sid = server.process.pid  # the server leads its own session; its backend stubs are in it
        assert len(session_members(sid)) >= 2, "expected the server and the model's backend stub"
        regions = lambda: list(Path("/dev/shm").glob(server.shm_prefix + "*"))
        assert regions(), "expected the backend's shared-memory regions under the server's own prefix"
        server.process.kill()  # as a crash would: the stub outlives its server, nobody unlinks the regions
        server.process.wait()
        server.stop()
        assert session_members(sid) == [] and regions() == []


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


def test_the_server_stops_when_the_process_that_started_it_is_killed(oracle_repository):
    """SIGKILL leaves no chance to stop the server in order: the kernel sends it SIGTERM (PR_SET_PDEATHSIG)."""
    script = ("import sys, time; from tools.local_triton import LocalTriton; "
              "s = LocalTriton(sys.argv[1]).start(); print(s.process.pid, flush=True); time.sleep(600)")
    owner = subprocess.Popen([sys.executable, "-c", script, str(oracle_repository)], cwd=PROJECT,
                             stdout=subprocess.PIPE, text=True)
    pid = None
    try:
        pid = int(owner.stdout.readline())
        server = psutil.Process(pid)
        assert "tritonserver" in server.name()
        owner.kill()
        owner.wait(10)
        server.wait(30)  # psutil.TimeoutExpired if it outlives its owner
    finally:
        owner.kill()
        if pid is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
