"""
schemathesis against the live BFF (real Triton behind it), with the shared contract and with the BFF's
own OpenAPI document: no server errors, and every response conforms.

Excluded checks, and why:
- positive_data_acceptance (both): a schema-valid conversation can still be refused with 400 by the model
  (longer than its context, or turns that do not alternate user/assistant), which no schema can express.
- status_code_conformance (contract only): the contract documents success codes only; the 400/401/404/413/
  503 answers it requires in prose are documented in the BFF's own document, where this check runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bff.validation import OPENAPI_PATH
from tools.bff_client import KEY, run_bff, triton_settings
from tools.local_triton import LocalTriton
from tools.paths import CONTRACT

pytestmark = pytest.mark.triton


def schemathesis(schema: Path, url: str, exclude: str) -> subprocess.CompletedProcess:
    st = Path(sys.executable).with_name("st")
    cmd = [str(st), "run", str(schema), "--url", url, "-H", f"X-Internal-API-Key: {KEY}", "--checks", "all",
           "--exclude-checks", exclude, "--max-examples", "12", "--seed", "5", "--request-timeout", "60",
           "--output-truncate", "true"]  # bounded by examples, not time: the same cases on every machine
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def fuzzed_url(oracle_repository, tmp_path_factory):
    """A BFF and Triton of their own over a repository holding only "demo": schemathesis reuses names it
    reads from GET /models in POST /models/swap, which must not swap the shared server's models.
    schemathesis drops most SSE streams after the first bytes, so the BFF cancels hundreds of Triton
    streams; short default answers keep that storm small, because the local Triton (2.51) can crash on a
    cancellation racing a response (fixed upstream in later releases, see docker/README.md)."""
    repository = tmp_path_factory.mktemp("fuzz_repository")
    (repository / "demo").symlink_to(oracle_repository / "demo")
    with LocalTriton(repository, load=["demo"]) as server, \
            run_bff(**triton_settings(server, model="demo", max_tokens=8)) as url:
        yield url


def test_own_document(fuzzed_url):
    run = schemathesis(OPENAPI_PATH, fuzzed_url, "positive_data_acceptance")
    assert run.returncode == 0, run.stdout[-6000:]


def test_contract(fuzzed_url):
    if not CONTRACT.is_file():
        pytest.skip(f"no contract at {CONTRACT}")
    run = schemathesis(CONTRACT, fuzzed_url, "positive_data_acceptance,status_code_conformance")
    assert run.returncode == 0, run.stdout[-6000:]
