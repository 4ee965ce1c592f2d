"""The BFF image's HEALTHCHECK command, run against live BFFs: healthy when ready, unhealthy when not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bff_client import run_bff
from tools.local_triton import free_port

DOCKERFILE = Path(__file__).resolve().parents[2] / "docker" / "bff.Dockerfile"


def healthcheck(url: str) -> int:
    """Exit status of the image's check, aimed at `url` instead of the container's 127.0.0.1:8003."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("HEALTHCHECK"))
    command = json.loads(line[line.index(" CMD ") + 5:])
    assert command[:2] == ["python", "-c"] and "http://127.0.0.1:8003/health" in command[2]
    code = command[2].replace("http://127.0.0.1:8003", url)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode


@pytest.mark.triton
def test_healthy_when_ready(bff_url):
    assert healthcheck(bff_url) == 0


def test_unhealthy_when_triton_is_unreachable():
    with run_bff(triton_urls=(f"127.0.0.1:{free_port()}",)) as url:
        assert healthcheck(url) == 1
