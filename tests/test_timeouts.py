"""
Every call the tests, the tools and the BFF make to a server names how long it may wait, read from the source:
a library's default is either too short for a loaded 2-core machine (httpx: 5 s, and a model load takes longer)
or no bound at all (tritonclient's control calls), so neither decides whether a test passes.
"""

from __future__ import annotations

import ast

import pytest

from tools.paths import PROJECT

FOLDERS = ("tests", "tools", "bff")
# the keyword that bounds each call: module functions and clients by their module, tritonclient's calls by name
MODULE_CALLS = {"httpx": ({"get", "post", "put", "patch", "delete", "head", "options", "request", "stream", "Client",
                           "AsyncClient"}, "timeout"),
                "openai": ({"OpenAI", "AsyncOpenAI"}, "timeout")}
NAMED_CALLS = {**dict.fromkeys(("load_model", "unload_model", "get_model_repository_index", "is_model_ready",
                                "is_server_ready", "is_server_live", "get_model_config", "get_model_metadata",
                                "get_server_metadata"), "client_timeout"),
               "urlopen": "timeout"}


def bound_keyword(call: ast.Call) -> str | None:
    """The keyword that bounds how long `call` may wait, when it is a call to a server; else None."""
    if not isinstance(call.func, ast.Attribute):
        return None
    owner = call.func.value.id if isinstance(call.func.value, ast.Name) else None
    names, keyword = MODULE_CALLS.get(owner, ((), None))
    return keyword if call.func.attr in names else NAMED_CALLS.get(call.func.attr)


def unbounded_calls(source: str) -> list[int]:
    """The lines of the calls in `source` that leave their timeout to the library."""
    return [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
            and (keyword := bound_keyword(node)) and keyword not in {k.arg for k in node.keywords}]


@pytest.mark.parametrize(("default", "named"), [
    ("httpx.get(url)", "httpx.get(url, timeout=9)"),
    ("httpx.AsyncClient()", "httpx.AsyncClient(timeout=9)"),
    ("client.load_model('m')", "client.load_model('m', client_timeout=9)"),
    ("urllib.request.urlopen(url)", "urllib.request.urlopen(url, timeout=9)"),
    ("openai.OpenAI(base_url=u)", "openai.OpenAI(base_url=u, timeout=9)"),
])
def test_a_call_left_on_the_default_is_found(default, named):
    assert unbounded_calls(default) == [1]
    assert unbounded_calls(named) == []


def test_every_call_to_a_server_names_its_timeout():
    found = {str(p.relative_to(PROJECT)): lines for folder in FOLDERS for p in sorted((PROJECT / folder).rglob("*.py"))
             if (lines := unbounded_calls(p.read_text()))}
    assert found == {}
