"""
An image's Python environment without Docker, as its Dockerfile makes it: the folders its COPY lines copy, then
`pip install` of the extras its RUN line names (GPU-only wheels left out), into a fresh virtual environment.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tools.paths import PROJECT

DOCKER = PROJECT / "docker"
GPU_ONLY = {"tensorrt"}  # extras whose wheels need an NVIDIA GPU


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
    wanted = [e for e in extras if e not in GPU_ONLY]
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    spec = f"{source}[{','.join(wanted)}]"
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
