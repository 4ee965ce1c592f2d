"""
schemathesis against the app in-process (its ASGI transport), over the fake: with the BFF's own OpenAPI
document and with the shared contract, no server errors and every response conforms. The fake refuses what
the backend would refuse, so a schema-valid body the BFF passes on outside the backend's ranges is a 500 here.

Excluded checks, and why:
- positive_data_acceptance (both): a schema-valid conversation can still be refused with 400 by the model
  (longer than its context, or turns that do not alternate user/assistant), which no schema can express.
- status_code_conformance (contract only): the contract documents success codes only; the 400/401/404/413/
  503 answers it requires in prose are documented in the BFF's own document, where this check runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import positive_data_acceptance, status_code_conformance

from tests.bff.inprocess.client import Bff
from tests.support.fake_triton import FakePool
from tools.bff_client import AUTH
from tools.paths import CONTRACT

FUZZ = hypothesis.settings(max_examples=12, deadline=None, database=None,
                          suppress_health_check=list(hypothesis.HealthCheck))


# One app for the module (schemathesis starts its lifespan once and keeps it); swaps move the fake's models.
REPOSITORY = tempfile.TemporaryDirectory(prefix="bff-fuzz-")
APP = Bff(FakePool(served=("head",), others=("demo",)), Path(REPOSITORY.name), max_tokens=8).app
OWN = schemathesis.openapi.from_asgi("/openapi.yaml", APP, headers=AUTH)
CONTRACT_SCHEMA = schemathesis.openapi.from_path(CONTRACT) if CONTRACT.is_file() else None
if CONTRACT_SCHEMA is not None:
    CONTRACT_SCHEMA.app = APP  # as from_asgi sets it


@hypothesis.seed(5)
@FUZZ
@OWN.parametrize()
def test_own_document(case):
    case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])


@pytest.mark.skipif(CONTRACT_SCHEMA is None, reason=f"no contract at {CONTRACT}")
@hypothesis.seed(5)
@FUZZ
@(CONTRACT_SCHEMA or OWN).parametrize()
def test_contract(case):
    case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance, status_code_conformance])
