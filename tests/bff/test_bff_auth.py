"""X-Internal-API-Key (or, as OpenAI clients send it, Authorization: Bearer): every protected route, every way
of getting it wrong, and the run-open switch."""

from __future__ import annotations

import httpx
import pytest

from bff.settings import from_env
from tools.bff_client import AUTH, KEY, run_bff
from tools.measure import SERVER_TIMEOUT_S

PROTECTED = [("POST", "/generate", {"messages": [{"role": "user", "content": "hi"}]}),
             ("GET", "/models", None), ("POST", "/models/swap", {"model_tag": "head"}), ("GET", "/stats", None),
             ("GET", "/metrics", None), ("GET", "/openapi.yaml", None)]
WRONG = {"missing": {}, "wrong": {"X-Internal-API-Key": "nope"}, "empty": {"X-Internal-API-Key": ""},
         "prefix": {"X-Internal-API-Key": KEY[:-1]}, "longer": {"X-Internal-API-Key": KEY + "x"},
         "other case": {"X-Internal-API-Key": KEY.upper()}, "wrong bearer": {"Authorization": f"Bearer {KEY}x"},
         "other scheme": {"Authorization": f"Basic {KEY}"}, "header wins": {"X-Internal-API-Key": "nope",
                                                                            "Authorization": f"Bearer {KEY}"}}


@pytest.mark.triton
@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[p[1] for p in PROTECTED])
@pytest.mark.parametrize("case", list(WRONG))
def test_protected_routes_need_the_key(bff_url, method, path, body, case):
    r = httpx.request(method, bff_url + path, json=body, headers=WRONG[case], timeout=SERVER_TIMEOUT_S)
    assert r.status_code == 401
    assert r.json() == {"detail": "missing or invalid X-Internal-API-Key (or Bearer key)"}


@pytest.mark.triton
@pytest.mark.parametrize("path", ["/v1/models", "/models"])
def test_a_bearer_key_opens_them_and_openais_routes_answer_401_in_openais_shape(bff_url, path):
    bearer = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(bff_url + path, headers=bearer, timeout=SERVER_TIMEOUT_S).status_code == 200
    r = httpx.get(bff_url + path, timeout=SERVER_TIMEOUT_S)
    assert r.status_code == 401
    if path.startswith("/v1/"):
        assert r.json()["error"]["type"] == "authentication_error"


@pytest.mark.triton
@pytest.mark.parametrize("path", ["/models", "/stats", "/metrics", "/openapi.yaml"])
def test_the_key_opens_them(bff_url, path):
    assert httpx.get(bff_url + path, headers=AUTH, timeout=SERVER_TIMEOUT_S).status_code == 200


@pytest.mark.triton
def test_health_needs_no_key(bff_url):
    r = httpx.get(bff_url + "/health", timeout=SERVER_TIMEOUT_S)
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "ready": True, "current_model": "head"}


@pytest.mark.parametrize("values", [{"ping_interval_s": 0}, {"first_response_wait_s": -1}])
def test_timings_must_make_sense(values):
    with pytest.raises(ValueError, match="BFF_PING_INTERVAL_S"):
        from_env({}, api_key="k" * 16, **values)


def test_refuses_to_start_without_a_key():
    with pytest.raises(ValueError, match="INTERNAL_API_KEY"):
        from_env({})


def test_refuses_a_short_key_and_an_open_switch_beside_a_key():
    with pytest.raises(ValueError, match="at least 16 characters"):
        from_env({"INTERNAL_API_KEY": "short-key"})
    with pytest.raises(ValueError, match="unset one of them"):  # before, the key was silently ignored
        from_env({"INTERNAL_API_KEY": "k" * 16, "BFF_RUN_OPEN": "1"})


@pytest.mark.triton
@pytest.mark.parametrize("given, kept", [("abc-123", True), ("x" * 129, False), ("a\tb", False)])
def test_the_request_id_is_kept_only_when_sane(bff_url, given, kept):
    r = httpx.get(bff_url + "/health", headers={"X-Request-ID": given}, timeout=SERVER_TIMEOUT_S)
    echoed = r.headers["x-request-id"]
    assert (echoed == given) == kept and len(echoed) <= 128


@pytest.mark.triton
def test_json_nested_a_thousand_deep_is_a_400_not_a_500(bff_url):
    body = '{"messages": ' + "[" * 1000 + "]" * 1000 + "}"
    r = httpx.post(bff_url + "/generate", content=body, headers={**AUTH, "Content-Type": "application/json"},
                   timeout=SERVER_TIMEOUT_S)
    assert r.status_code == 400 and r.json() == {"detail": "body is nested more than 16 levels deep"}


def test_runs_open_only_when_told():
    with run_bff(api_key=None, run_open=True, triton_urls=("127.0.0.1:1",)) as url:
        assert httpx.get(url + "/models", timeout=SERVER_TIMEOUT_S).status_code == 200
        assert httpx.get(url + "/openapi.yaml", timeout=SERVER_TIMEOUT_S).status_code == 200


def test_metrics_need_the_key_unless_opened_for_prometheus():
    with run_bff(triton_urls=("127.0.0.1:1",)) as url:
        assert httpx.get(url + "/metrics", timeout=SERVER_TIMEOUT_S).status_code == 401
    with run_bff(triton_urls=("127.0.0.1:1",), metrics_open=True) as url:
        assert httpx.get(url + "/metrics", timeout=SERVER_TIMEOUT_S).status_code == 200
        assert httpx.get(url + "/stats", timeout=SERVER_TIMEOUT_S).status_code == 401  # only the scrape path opens
