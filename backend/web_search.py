"""
samosaChaat's `web_search` tool: a query goes to the operator's search backend (Tavily or SearXNG, from the
environment), and explicit `urls` are fetched through fetch_public. The links a search returns are never fetched:
only URLs the model names go out, each checked for a public address first. The backend's own URL is the operator's,
and trusted (a SearXNG on the LAN).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import httpx

from backend.public_fetch import Page, fetch_public, page_text
from core.tool_calls import ToolError

NO_BACKEND = "no search backend configured"
TAVILY_URL = "https://api.tavily.com"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_TOP_K, MAX_TOP_K, MAX_URLS = 3, 8, 8
SNIPPET_CHARS = 600
MAX_BACKEND_BYTES = 1 << 20
MAX_PAGE_BYTES = 256 * 1024


class SearchBackend(Protocol):
    name: ClassVar[str]

    def search(self, query: str, top_k: int, timeout_s: float) -> list[dict]: ...


@dataclass(frozen=True)
class Tavily:
    api_key: str = field(repr=False)
    base_url: str = TAVILY_URL
    name: ClassVar[str] = "tavily"

    def search(self, query: str, top_k: int, timeout_s: float) -> list[dict]:
        body = {"query": query, "max_results": top_k, "include_answer": False, "include_raw_content": False,
                "search_depth": "basic"}
        data = _backend_json("POST", f"{self.base_url.rstrip('/')}/search", timeout_s, json=body,
                             headers={"Authorization": f"Bearer {self.api_key}"})
        return [_hit(r.get("url"), r.get("title"), r.get("content")) for r in data["results"] if isinstance(r, dict)]


@dataclass(frozen=True)
class SearXNG:
    base_url: str
    name: ClassVar[str] = "searxng"

    def search(self, query: str, top_k: int, timeout_s: float) -> list[dict]:
        # format=json must be enabled in the instance's settings.yml (search.formats), else it answers 403
        data = _backend_json("GET", f"{self.base_url.rstrip('/')}/search", timeout_s,
                             params={"q": query, "format": "json"})
        return [_hit(r.get("url"), r.get("title"), r.get("content")) for r in data["results"] if isinstance(r, dict)]


def _backend_json(method: str, url: str, timeout_s: float, **kwargs) -> dict:
    """The backend's JSON answer (an object with a results list), read up to MAX_BACKEND_BYTES; else ToolError."""
    try:
        with (httpx.Client(timeout=timeout_s, trust_env=False) as client,
              client.stream(method, url, **kwargs) as response):
            if not response.is_success:
                raise ToolError(f"search backend failed: HTTP {response.status_code}")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_BACKEND_BYTES:
                    raise ToolError(f"search backend failed: answer over {MAX_BACKEND_BYTES} bytes")
        data = json.loads(body)
    except httpx.TimeoutException:
        raise ToolError("search backend failed: timed out") from None
    except httpx.HTTPError as e:
        raise ToolError(f"search backend failed: {str(e) or type(e).__name__}") from None
    except ValueError:
        raise ToolError("search backend failed: unreadable JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ToolError("search backend failed: no results list in its answer")
    return data


def _hit(url: object, title: object, snippet: object) -> dict:
    """A result as the model reads it: url, and title and snippet when there are any."""
    hit: dict = {"url": url}
    if isinstance(title, str) and title.strip():
        hit["title"] = title.strip()
    if isinstance(snippet, str) and snippet.strip():
        hit["snippet"] = snippet.strip()[:SNIPPET_CHARS]
    return hit


def _top_k(value: object) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ToolError(f"top_k must be an integer, not {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ToolError(f"top_k must be an integer, not {value!r}")
    return max(1, min(value, MAX_TOP_K))


def _urls(value: object) -> list[str]:
    urls = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if urls is None or not all(isinstance(u, str) for u in urls):
        raise ToolError("urls must be a string or a list of strings")
    urls = [u.strip() for u in urls if u.strip()]
    if len(urls) > MAX_URLS:
        raise ToolError(f"at most {MAX_URLS} urls, not {len(urls)}")
    return urls


class WebSearch:
    """The tool: arguments {"query", "top_k", "urls"} -> ({"query", "results"}, {"search_backend", "num_results"}).
    timeout_s bounds each HTTP call (the urls are fetched in parallel); fetch is fetch_public (tests widen it)."""

    def __init__(self, backend: SearchBackend, timeout_s: float, *,
                 fetch: Callable[..., Page] = fetch_public) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        self.fetch = fetch

    def __call__(self, arguments: dict) -> tuple[dict, dict]:
        query = arguments.get("query") or ""
        if not isinstance(query, str):
            raise ToolError("query must be a string")
        query = query.strip()
        top_k = _top_k(arguments["top_k"] if arguments.get("top_k") is not None else DEFAULT_TOP_K)
        urls = _urls(arguments.get("urls") or [])
        if not query and not urls:
            raise ToolError("Missing query or urls")
        if urls:  # as samosaChaat: explicit urls are read instead of searching
            with ThreadPoolExecutor(max_workers=len(urls)) as pool:
                results = list(pool.map(self._read, urls))
        else:
            results = [hit for hit in self.backend.search(query, top_k, self.timeout_s)
                       if isinstance(hit["url"], str) and hit["url"]][:top_k]
        return {"query": query, "results": results}, {"search_backend": self.backend.name,
                                                      "num_results": len(results)}

    def _read(self, url: str) -> dict:
        """One requested page as a result, or {"url", "error"}: one bad URL does not fail the call."""
        try:
            page = self.fetch(url, timeout_s=self.timeout_s, max_bytes=MAX_PAGE_BYTES)
            if page.status >= 400:
                return {"url": url, "error": f"HTTP {page.status}"}
            title, text = page_text(page)
        except ToolError as e:
            return {"url": url, "error": str(e)}
        return _hit(page.url, title, text)


def from_env(environ: Mapping[str, str], *, timeout_s: float = DEFAULT_TIMEOUT_S) -> WebSearch | None:
    """The tool over the backend the environment names: TAVILY_API_KEY (and TAVILY_URL) first, else SEARXNG_URL;
    None when neither is set (a call then fails with NO_BACKEND)."""
    if key := environ.get("TAVILY_API_KEY", "").strip():
        return WebSearch(Tavily(key, environ.get("TAVILY_URL", "").strip() or TAVILY_URL), timeout_s)
    if url := environ.get("SEARXNG_URL", "").strip():
        return WebSearch(SearXNG(url), timeout_s)
    return None
