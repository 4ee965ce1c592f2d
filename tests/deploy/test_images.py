"""
Each image's Python environment does its job, without Docker: for the Triton image and the BFF image, a
fresh virtual environment gets exactly what the Dockerfile gives it (the folders its COPY lines copy, then
`pip install` of the extras its RUN line names, TensorRT's bindings left out), and the real servers run from it:
the local Triton with the backend importing only from the Triton image's environment, the BFF under
gunicorn (the image's command) from the BFF image's, and one /generate streams through both. A serving
module that imports something its image lacks fails here.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.bffkit import is_done, wait_until
from tests.support.images import DOCKER, image_recipe, site_packages
from tools.bff_client import AUTH, KEY, generate, health, ready, text_of
from tools.local_triton import LocalTriton, free_port

pytestmark = pytest.mark.triton
def test_recipes_are_read_from_the_dockerfiles():
    copies, extras, editable = image_recipe(DOCKER / "triton.Dockerfile", "triton")
    assert extras == ["core", "backend"] and not editable
    assert (["core/"], "core/") in copies and (["backend/model.py"], "/opt/tritonserver/backends/nanochat/model.py") \
        in copies
    copies, extras, editable = image_recipe(DOCKER / "bff.Dockerfile", "build")
    assert extras == ["bff"] and editable
    assert (["backend/__init__.py", "backend/protocol.py"], "backend/") in copies
    assert (["core/__init__.py", "core/config_fields.py"], "core/") in copies


@pytest.fixture(scope="module")
def triton_image_env(image_envs):
    return image_envs()["triton"]  # built in the background since the session began (tests/conftest.py)


@pytest.fixture(scope="module")
def bff_image_env(image_envs):
    return image_envs()["bff"]


def test_the_triton_image_imports_its_serving_modules_and_nothing_of_the_bff(triton_image_env):
    venv, source = triton_image_env
    python = str(venv / "bin" / "python")
    serving = "import backend.scheduler, backend.runner, backend.onnx_runner, backend.metrics, torch, onnxruntime"
    proc = subprocess.run([python, "-c", serving], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([python, "-c", "import falcon"], capture_output=True, text=True, cwd="/")
    assert "No module named 'falcon'" in proc.stderr  # the BFF's dependencies are not in this image
    assert not (source / "bff").exists() and not (source / "export").exists()


def test_the_bff_image_has_no_model_dependencies(bff_image_env):
    venv, _ = bff_image_env
    python = str(venv / "bin" / "python")
    for module in ("torch", "onnxruntime", "tiktoken"):
        proc = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, cwd="/")
        assert proc.returncode != 0, f"the BFF image's environment has {module}"


def test_a_stream_through_both_images_environments(triton_image_env, bff_image_env, oracle_repository,
                                                   tmp_path):
    triton_venv, _ = triton_image_env
    bff_venv, bff_source = bff_image_env
    repository = tmp_path / "repository"
    repository.mkdir()
    (repository / "demo").symlink_to(oracle_repository / "demo")
    # the backend imports from the Triton image's environment only: not this checkout, not the test's venv
    with LocalTriton(repository, load=["demo"], sys_path=[site_packages(triton_venv)]) as server:
        port = free_port()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("BFF_", "PYTHON"))},
               "INTERNAL_API_KEY": KEY, "BFF_TRITON_URLS": server.grpc_url, "BFF_TRITON_METRICS_URLS":
               server.metrics_url, "BFF_MODEL": "demo", "BFF_MODEL_REPOSITORY": str(repository), "BFF_WORKERS": "1"}
        cmd = [str(bff_venv / "bin" / "gunicorn"), "--config", str(bff_source / "bff" / "gunicorn_conf.py"),
               "--bind", f"127.0.0.1:{port}", "bff.app:app"]  # the BFF image's CMD
        proc = subprocess.Popen(cmd, env=env, cwd=bff_source, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: proc.poll() is None and ready(url), "the BFF image's environment did not serve",
                       timeout=60)
            assert health(url) == {"status": "ok", "ready": True, "current_model": "demo"}
            r, events = generate(url, {"messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                                       "max_tokens": 8}, headers=AUTH)
            assert r.status_code == 200 and is_done(events[-1]) and text_of(events)
        finally:
            proc.terminate()
            proc.wait(30)
