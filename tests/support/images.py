"""
An image's Python environment without Docker, as its Dockerfile makes it: the folders its COPY lines copy, then
`pip install` of the extras its RUN line names (not TensorRT's bindings, which need the container's TensorRT), into
a fresh virtual environment. Also each stage's `pip install` lines as arguments, and what each Triton release ships.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tools.paths import PROJECT

DOCKER = PROJECT / "docker"


@dataclass(frozen=True)
class TritonRelease:
    cuda: str  # the container's CUDA (NGC release notes)
    tensorrt: str  # the container's TensorRT, which the bindings pin must equal


# What each Triton release we may pin ships. 25.10: CUDA 13.0.2.006 (its release notes); TensorRT 10.13.3.9, the
# TensorRT NVIDIA's compatibility matrix pairs with that CUDA in the Triton 25.11 and 25.12 TRT-LLM rows (the image
# build checks the library it loads, backend/tensorrt_module.py).
TRITON_RELEASES = {"25.10": TritonRelease(cuda="13.0", tensorrt="10.13.3.9")}


def stage_lines(dockerfile: Path, stage: str) -> list[str]:
    """The instructions of one build stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    lines, current = [], None
    for line in text.splitlines():
        if m := re.match(r"FROM \S+(?: AS (\S+))?", line):
            current = m.group(1)
        elif current == stage and line and not line.startswith("#"):
            lines.append(line)
    return lines


def pip_installs(dockerfile: Path, stage: str) -> list[list[str]]:
    """The arguments of each `pip install` in a stage's RUN lines, in order."""
    runs = [line.removeprefix("RUN ") for line in stage_lines(dockerfile, stage) if line.startswith("RUN ")]
    commands = [c.strip() for run in runs for c in run.split("&&")]
    return [shlex.split(c)[2:] for c in commands if re.match(r"(\S*/)?pip install ", c)]


def image_recipe(dockerfile: Path, stage: str | None) -> tuple[list[tuple[list[str], str]], list[str], bool]:
    """(COPY sources and destination, the extras pip installs, editable?) of an image's stage."""
    lines = stage_lines(dockerfile, stage)
    copies = []
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, dest = line.split()[1:]
            copies.append((sources, dest))
    install = next(line for line in lines if re.search(r"pip install .*\.\[", line))
    extras = re.search(r'(-e )?"\.\[([a-z,]+)\]"', install)
    return copies, extras.group(2).split(","), bool(extras.group(1))


def build_environment(tmp: Path, dockerfile: Path, stage: str | None, nice: int = 0) -> tuple[Path, Path]:
    """The image's source tree and a fresh venv with its extras; returns (venv, source)."""
    copies, extras, editable = image_recipe(dockerfile, stage)
    source = tmp / "src"
    for sources, dest in copies:  # Docker's rules: a folder's contents go into dest; a file into dest/ or as dest
        if dest.startswith("/"):
            continue  # into the server's own folders (the backend file), not the project
        for s in sources:
            src = PROJECT / s
            if src.is_dir():
                shutil.copytree(src, source / dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                to = source / dest / src.name if dest.endswith("/") else source / dest
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, to)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    spec = f"{source}[{','.join(extras)}]"
    # --no-compile: the same files; Python compiles what it imports when it imports it (faster to install)
    cmd = ["nice", "-n", str(nice), str(venv / "bin" / "pip"), "install", "-q", "--no-compile",
           *(["-e"] if editable else []), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv, source


def site_packages(venv: Path) -> str:
    return sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})


RECIPES = {"triton": ("triton.Dockerfile", "triton"), "bff": ("bff.Dockerfile", "build")}


def start_image_envs(tmp: Callable[[str], Path], nice: int = 0) -> tuple[Callable[[], dict], ThreadPoolExecutor]:
    """Both images' environments, built side by side from now (each pip install is mostly one process unpacking
    wheels); returns a function that waits for them and gives name -> (venv, source), and the pool."""
    pool = ThreadPoolExecutor(len(RECIPES))
    futures = {name: pool.submit(build_environment, tmp(f"{name}_image"), DOCKER / file, stage, nice)
               for name, (file, stage) in RECIPES.items()}
    return lambda: {name: f.result() for name, f in futures.items()}, pool


# ---------------------------------------------------------------- what pip would install in each image

# image -> (Dockerfile, stage, the base image's glibc): Ubuntu 24.04 in Triton's images, Debian 13 in python:3.12-slim
IMAGES = {"triton": ("triton.Dockerfile", "triton", 39), "export": ("triton.Dockerfile", "export", 39),
          "bff": ("bff.Dockerfile", "build", 41)}
PYTHON = "3.12"  # both bases
Resolution = tuple[list[str], "dict[str, str] | None", str]  # a pip install line's args, its packages, pip's error


def target(glibc: int) -> list[str]:
    """pip's options for wheels a CPython 3.12 on x86-64 with this glibc takes: manylinux_2_N for N up to glibc, and
    the legacy names (manylinux2014 is 2_17), which pip does not infer from --platform."""
    tags = [f"manylinux_2_{n}_x86_64" for n in range(glibc, 4, -1)]
    tags += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    return ["--python-version", PYTHON, "--implementation", "cp", *[a for t in tags for a in ("--platform", t)]]


def resolve(args: list[str], glibc: int, nice: int = 0) -> tuple[dict[str, str] | None, str]:
    """{package: version} pip would install for one `pip install` line (None and pip's explanation when it cannot)."""
    # editable or not, the same packages; wheels only, as pip requires for another platform (an sdist would be
    # built on the image's own Python, which this resolution cannot stand in for)
    args = [a for a in args if a not in ("-e", "--only-binary=:all:")]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = ["nice", "-n", str(nice), sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
               "--report", str(report), "--only-binary=:all:",
               "--use-feature=fast-deps",  # metadata by HTTP range requests, not GBs of CUDA wheels
               *target(glibc), *args]
        # this machine's pip configuration (local wheel folders, constraints) is not the image's
        env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_CONSTRAINT")}
        env["PIP_CONFIG_FILE"] = os.devnull
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT, env=env, timeout=300)
        if proc.returncode != 0:
            lines = (proc.stdout + proc.stderr).splitlines()
            return None, "\n".join(line for line in lines if "Location 'file:" not in line)[-3000:]
        installs = json.loads(report.read_text())["install"]
    return {name(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}, ""


def name(package: str) -> str:
    return re.sub(r"[-_.]+", "-", package).lower()  # PEP 503


def registry_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=10).close()
        return True
    except OSError:
        return False


def start_resolutions(nice: int = 0) -> tuple[Callable[[], dict[str, list[Resolution]]], ThreadPoolExecutor]:
    """Every image's pip install lines resolved side by side from now; returns a function that waits and gives
    image -> [(args, packages, error)], and the pool. Without the registry the function skips, saying so."""
    jobs = [(image, args, glibc) for image, (file, stage, glibc) in IMAGES.items()
            for args in pip_installs(DOCKER / file, stage)]
    pool = ThreadPoolExecutor(len(jobs))
    reachable = pool.submit(registry_reachable)
    futures = [(image, args, pool.submit(resolve, args, glibc, nice)) for image, args, glibc in jobs]

    def wait() -> dict[str, list[Resolution]]:
        if not reachable.result():
            pytest.skip("PyPI is not reachable from here: the images' dependency sets cannot be resolved")
        out: dict[str, list[Resolution]] = {image: [] for image in IMAGES}
        for image, args, f in futures:
            out[image].append((args, *f.result()))
        return out

    return wait, pool
