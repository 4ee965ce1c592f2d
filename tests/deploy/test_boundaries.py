"""
The layout's boundaries, read from the source (every import statement, also those inside functions):
data flows checkpoint -> export -> model repository -> backend -> BFF, and each folder imports only
what the folders before it offer and its image installs.

    core     nothing of the project; no Triton, ONNX or HTTP
    backend  core; only backend/model.py imports triton_python_backend_utils
    export   core, and of the backend its contract (protocol, model_config) and runners
    bff      of the project only backend.protocol and core.config_fields (standard library): no numpy, torch
             or tokenizer
    tools, tests   anything
"""

from __future__ import annotations

import ast
import sys

import pytest

from tools.paths import PROJECT

PACKAGES = ("core", "backend", "export", "bff", "tools")
EXPORT_MAY_USE = {"backend.protocol", "backend.model_config", "backend.onnx_runner", "backend.trt_runner",
                  "backend.tensorrt_module"}
BFF_MAY_USE = {"backend.protocol", "core.config_fields"}  # standard library only: the BFF's image copies just these


def imports(path) -> set[str]:
    """Every module an import statement in the file names (absolute imports: the project uses no others)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names if node.module in PACKAGES}
    return names


def modules(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(PROJECT)): imports(p) for p in sorted((PROJECT / package).rglob("*.py"))}


def project(names: set[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] in PACKAGES}


def top(name: str) -> str:
    return name.split(".")[0]


def test_core_imports_nothing_of_the_project_nor_serving():
    for path, names in modules("core").items():
        assert {n for n in project(names) if top(n) != "core"} == set(), path
        assert not {n for n in names if top(n) in ("triton_python_backend_utils", "tritonclient", "onnx",
                                                   "onnxruntime", "tensorrt", "falcon", "httpx", "uvicorn")}, path


def test_backend_imports_core_and_itself_and_only_model_py_imports_triton():
    for path, names in modules("backend").items():
        assert {top(n) for n in project(names)} <= {"core", "backend"}, path
        if path != "backend/model.py":
            assert "triton_python_backend_utils" not in names, path
        # httpx: only web_search's own HTTP (its backend, and public pages), not a client of the project's servers
        http = () if path in ("backend/web_search.py", "backend/public_fetch.py") else ("httpx",)
        assert not {n for n in names if top(n) in ("falcon", "uvicorn", "tritonclient", "onnx", *http)}, path
    protocol = imports(PROJECT / "backend" / "protocol.py") | imports(PROJECT / "backend" / "model_config.py")
    assert project(protocol) <= {"backend", "backend.protocol", "core.config_fields"}  # the BFF imports protocol
    assert not {n for n in protocol if top(n) in ("numpy", "torch", "tiktoken")}


def test_what_the_bff_imports_of_the_project_is_standard_library_only():
    for module in BFF_MAY_USE:
        names = imports(PROJECT.joinpath(*module.split(".")).with_suffix(".py"))
        assert {top(n) for n in names if top(n) not in PACKAGES} <= set(sys.stdlib_module_names), module
        assert project(names) <= {"backend", "core"} | BFF_MAY_USE, module


def test_export_imports_core_and_the_backends_contract_and_runners():
    for path, names in modules("export").items():
        backend = {n for n in project(names) if top(n) == "backend"}
        assert backend <= EXPORT_MAY_USE | {"backend"}, (path, backend - EXPORT_MAY_USE)
        assert {top(n) for n in project(names)} <= {"core", "backend", "export"}, path


def test_bff_imports_only_the_protocol_of_the_backend_and_the_config_dialect():
    for path, names in modules("bff").items():
        outside = {n for n in project(names) if top(n) != "bff"}
        assert outside <= BFF_MAY_USE, (path, outside)
        assert not {n for n in names if top(n) in ("numpy", "torch", "tiktoken", "onnxruntime")}, path


def test_nothing_shipped_imports_the_tools():
    for package in ("core", "backend", "export", "bff"):
        for path, names in modules(package).items():
            assert "tools" not in {top(n) for n in project(names)}, path


@pytest.mark.parametrize("source, rule", [
    ("import tools.measure", "tools.measure"),
    ("from backend import scheduler", "backend.scheduler"),
    ("def f():\n    import torch", "torch"),
])
def test_the_reader_sees_every_kind_of_import(tmp_path, source, rule):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert rule in imports(path)
