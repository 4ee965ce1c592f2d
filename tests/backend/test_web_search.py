"""
backend/web_search.py against loopback servers that speak Tavily's and SearXNG's JSON: what each backend is sent,
what the model reads back, the argument rules, backend failures as ToolError, and explicit urls read through
fetch_public (loopback allowed by the test, a private address refused in its own result).
"""

from __future__ import annotations

import json
from functools import partial

import pytest

from backend.public_fetch import fetch_public
from backend.web_search import NO_BACKEND, TAVILY_URL, SearXNG, Tavily, WebSearch, from_env
from core.tool_calls import ToolCall, ToolError, ToolRegistry
from tests.support.httpkit import LOOPBACK, html, json_reply, searxng_results

TIMEOUT_S = 2.0


def test_tavily_request_and_results(server):
    server.routes["/tavily/search"] = json_reply({"query": "q", "results": [
        {"title": " First ", "url": "https://a.test/", "content": "x" * 1000, "score": 0.9},
        {"title": "", "url": "https://b.test/", "content": "", "score": 0.5},
        {"title": "Third", "url": "https://c.test/", "content": "c", "score": 0.1},
    ]})
    tool = WebSearch(Tavily("tvly-secret", server.url("/tavily/")), TIMEOUT_S)
    output, metadata = tool({"query": "  samosa recipe ", "top_k": 2})
    assert output == {"query": "samosa recipe", "results": [
        {"url": "https://a.test/", "title": "First", "snippet": "x" * 600},
        {"url": "https://b.test/"},
    ]}
    assert metadata == {"search_backend": "tavily", "num_results": 2}
    [seen] = server.requests
    assert (seen.method, seen.path, seen.headers["Authorization"]) == ("POST", "/tavily/search", "Bearer tvly-secret")
    assert json.loads(seen.body) == {"query": "samosa recipe", "max_results": 2, "include_answer": False,
                                     "include_raw_content": False, "search_depth": "basic"}
    assert "tvly-secret" not in repr(tool.backend)
    assert [r.path for r in server.requests] == ["/tavily/search"]  # the results' links are not fetched


def test_searxng_request_and_results(server):
    server.routes["/search"] = json_reply({"query": "q", "results": [
        {"url": "https://a.test/", "title": "A", "content": "about a", "engine": "ddg"},
        {"url": "https://b.test/"},
        {"title": "no url"},
    ]})
    output, metadata = WebSearch(SearXNG(server.url("")), TIMEOUT_S)({"query": "chaat"})
    assert output["results"] == [{"url": "https://a.test/", "title": "A", "snippet": "about a"},
                                 {"url": "https://b.test/"}]
    assert metadata == {"search_backend": "searxng", "num_results": 2}
    [seen] = server.requests
    assert (seen.method, seen.path, seen.query) == ("GET", "/search", {"q": ["chaat"], "format": ["json"]})


@pytest.mark.parametrize("top_k, expected", [(None, 3), (0, 1), (-5, 1), (5, 5), (100, 8), ("2", 2), (4.0, 4)])
def test_top_k_is_clamped(server, top_k, expected):
    server.routes["/search"] = json_reply(searxng_results(10))
    output, metadata = WebSearch(SearXNG(server.url("")), TIMEOUT_S)({"query": "q", "top_k": top_k})
    assert len(output["results"]) == metadata["num_results"] == expected


def test_tavily_is_asked_for_the_clamped_count(server):
    server.routes["/search"] = json_reply({"results": []})
    WebSearch(Tavily("k", server.url("")), TIMEOUT_S)({"query": "q", "top_k": 50})
    assert json.loads(server.requests[0].body)["max_results"] == 8


@pytest.mark.parametrize("arguments, message", [
    ({}, "Missing query or urls"),
    ({"query": "   ", "urls": []}, "Missing query or urls"),
    ({"query": "q", "top_k": "many"}, "top_k must be an integer"),
    ({"query": "q", "top_k": 2.5}, "top_k must be an integer"),
    ({"query": "q", "top_k": True}, "top_k must be an integer"),
    ({"query": 7}, "query must be a string"),
    ({"urls": [1]}, "urls must be a string or a list of strings"),
    ({"urls": [f"https://{i}.test/" for i in range(9)]}, "at most 8 urls"),
])
def test_bad_arguments(server, arguments, message):
    with pytest.raises(ToolError, match=message):
        WebSearch(SearXNG(server.url("")), TIMEOUT_S)(arguments)
    assert server.requests == []


@pytest.mark.parametrize("reply, message", [
    ((500, {}, b"boom"), "search backend failed: HTTP 500"),
    ((200, {"Content-Type": "application/json"}, b"{not json"), "search backend failed: unreadable JSON"),
    (json_reply({"answer": "no results key"}), "search backend failed: no results list"),
    ((200, {}, b" " * (1 << 20) + b"{}"), "search backend failed: answer over 1048576 bytes"),
], ids=["500", "bad json", "no results", "too long"])
def test_backend_failures(server, reply, message):
    server.routes["/search"] = reply
    with pytest.raises(ToolError, match=message):
        WebSearch(Tavily("k", server.url("")), TIMEOUT_S)({"query": "q"})


def test_a_hanging_backend_times_out(silent_port):
    with pytest.raises(ToolError, match="search backend failed: timed out"):
        WebSearch(SearXNG(f"http://127.0.0.1:{silent_port}"), 0.3)({"query": "q"})


def test_a_failure_reaches_the_model_as_a_tool_error(server):
    server.routes["/search"] = (503, {}, b"")
    result = ToolRegistry({"web_search": WebSearch(SearXNG(server.url("")), TIMEOUT_S)}).execute(
        ToolCall("web_search", {"query": "q"}))
    assert (result.success, result.error) == (False, "search backend failed: HTTP 503")


def test_urls_are_read_each_on_its_own(server):
    server.routes["/page"] = html("<title>Samosa</title><body><h1>Filling</h1><p>" + "potato " * 200 + "</p></body>")
    server.routes["/doc.txt"] = (200, {"Content-Type": "text/plain"}, b"plain words")
    tool = WebSearch(SearXNG(server.url("/searxng")), TIMEOUT_S, fetch=partial(fetch_public, allow=LOOPBACK))
    output, metadata = tool({"urls": [server.url("/page"), "http://10.0.0.1/", server.url("/missing"),
                                      server.url("/doc.txt"), "ftp://a.test/"]})
    page, private, missing, text, ftp = output["results"]
    assert (page["url"], page["title"]) == (server.url("/page"), "Samosa")
    assert page["snippet"].startswith("Filling potato potato") and len(page["snippet"]) == 600
    assert private == {"url": "http://10.0.0.1/", "error": "refused: 10.0.0.1 is not a public address"}
    assert missing == {"url": server.url("/missing"), "error": "HTTP 404"}
    assert text == {"url": server.url("/doc.txt"), "snippet": "plain words"}
    assert ftp["error"].startswith("refused:")
    assert (output["query"], metadata) == ("", {"search_backend": "searxng", "num_results": 5})
    assert "/searxng/search" not in [r.path for r in server.requests]  # urls are read instead of searching


def test_urls_without_allow_refuse_loopback(server):
    server.routes["/page"] = html("<title>x</title>")
    output, _ = WebSearch(SearXNG(server.url("")), TIMEOUT_S)({"urls": server.url("/page")})
    assert output["results"] == [{"url": server.url("/page"), "error": "refused: 127.0.0.1 is not a public address"}]
    assert server.requests == []


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"TAVILY_API_KEY": " ", "SEARXNG_URL": ""}, None),
    ({"TAVILY_API_KEY": "k"}, Tavily("k", TAVILY_URL)),
    ({"TAVILY_API_KEY": "k", "TAVILY_URL": "http://tavily.internal:8080"}, Tavily("k", "http://tavily.internal:8080")),
    ({"SEARXNG_URL": "http://searx:8888"}, SearXNG("http://searx:8888")),
    ({"TAVILY_API_KEY": "k", "SEARXNG_URL": "http://searx:8888"}, Tavily("k", TAVILY_URL)),
], ids=["none", "blank", "tavily", "tavily url", "searxng", "both: tavily"])
def test_from_env(environ, expected):
    tool = from_env(environ, timeout_s=5.0)
    assert (tool and tool.backend) == expected
    if tool is not None:
        assert tool.timeout_s == 5.0


def test_no_backend_message():
    assert NO_BACKEND == "no search backend configured"
