"""X-Internal-API-Key (or, as OpenAI clients send it, Authorization: Bearer): every protected route, every way
of getting it wrong, the public routes, the run-open switch, and the request id."""

from __future__ import annotations

import pytest

from bff.settings import from_env
from tests.bff.inprocess.client import Bff
from tools.bff_client import AUTH, KEY

PROTECTED = [("POST", "/generate", {"messages": [{"role": "user", "content": "hi"}]}),
             ("GET", "/models", None), ("POST", "/models/swap", {"model_tag": "head"}), ("GET", "/stats", None),
             ("GET", "/metrics", None), ("GET", "/openapi.yaml", None)]
WRONG = {"missing": {}, "wrong": {"X-Internal-API-Key": "nope"}, "empty": {"X-Internal-API-Key": ""},
         "prefix": {"X-Internal-API-Key": KEY[:-1]}, "longer": {"X-Internal-API-Key": KEY + "x"},
         "other case": {"X-Internal-API-Key": KEY.upper()}, "wrong bearer": {"Authorization": f"Bearer {KEY}x"},
         "other scheme": {"Authorization": f"Basic {KEY}"}, "header wins": {"X-Internal-API-Key": "nope",
                                                                            "Authorization": f"Bearer {KEY}"}}


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[p[1] for p in PROTECTED])
@pytest.mark.parametrize("case", list(WRONG))
def test_protected_routes_need_the_key(bff, method, path, body, case):
    r = bff.request(method, path, json=body, headers=WRONG[case])
    assert r.status_code == 401
    assert r.json() == {"detail": "missing or invalid X-Internal-API-Key (or Bearer key)"}
    assert bff.pool.opened == [] and bff.pool.states["head"] == "READY"


@pytest.mark.parametrize("path", ["/v1/models", "/models"])
def test_a_bearer_key_opens_them_and_openais_routes_answer_401_in_openais_shape(bff, path):
    assert bff.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    r = bff.get(path, headers={})
    assert r.status_code == 401
    if path.startswith("/v1/"):
        assert r.json()["error"]["type"] == "authentication_error"


def test_a_bearer_key_opens_chat_completions(bff):
    body = {"model": "head", "messages": [{"role": "user", "content": "hi"}]}
    assert bff.post("/v1/chat/completions", body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert bff.post("/v1/chat/completions", body, headers={}).json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("path", ["/models", "/stats", "/metrics", "/openapi.yaml"])
def test_the_key_opens_them(bff, path):
    assert bff.get(path, headers=AUTH).status_code == 200


def test_health_needs_no_key(bff):
    r = bff.get("/health", headers={})
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "ready": True, "current_model": "head"}


@pytest.mark.parametrize("values, variable", [({"ping_interval_s": 0}, "BFF_PING_INTERVAL_S"),
                                              ({"first_response_wait_s": -1}, "BFF_FIRST_RESPONSE_WAIT_S")])
def test_timings_must_make_sense(values, variable):
    with pytest.raises(ValueError, match=variable):
        from_env({}, api_key="k" * 16, **values)


def test_refuses_to_start_without_a_key():
    with pytest.raises(ValueError, match="INTERNAL_API_KEY"):
        from_env({})


def test_refuses_a_short_key_and_an_open_switch_beside_a_key():
    with pytest.raises(ValueError, match="at least 16 characters"):
        from_env({"INTERNAL_API_KEY": "short-key"})
    with pytest.raises(ValueError, match="unset one of them"):  # before, the key was silently ignored
        from_env({"INTERNAL_API_KEY": "k" * 16, "BFF_RUN_OPEN": "1"})


@pytest.mark.parametrize("given, kept", [("abc-123", True), ("x" * 129, False), ("a\tb", False)])
def test_the_request_id_is_kept_only_when_sane(bff, given, kept):
    r = bff.get("/health", headers={"X-Request-ID": given})
    echoed = r.headers["x-request-id"]
    assert (echoed == given) == kept and len(echoed) <= 128


def test_runs_open_only_when_told(pool, tmp_path):
    bff = Bff(pool, tmp_path, api_key=None, run_open=True)
    assert bff.get("/models", headers={}).status_code == 200
    assert bff.get("/openapi.yaml", headers={}).status_code == 200
    assert bff.post("/generate", {"messages": [{"role": "user", "content": "hi"}]}, headers={}).status_code == 200


def test_metrics_need_the_key_unless_opened_for_prometheus(pool, tmp_path):
    assert Bff(pool, tmp_path).get("/metrics", headers={}).status_code == 401
    opened = Bff(pool, tmp_path, metrics_open=True)
    assert opened.get("/metrics", headers={}).status_code == 200
    assert opened.get("/stats", headers={}).status_code == 401  # only the scrape path opens
