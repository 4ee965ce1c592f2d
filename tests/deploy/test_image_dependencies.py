"""
Each image's `pip install` lines resolve, as written in its Dockerfile, against PyPI for the image's own Python and
glibc (wheels only, pip's --dry-run report; nothing is downloaded but metadata): no conflict, every package pinned
by the image's constraints file, no pin that no image installs, and in the GPU images a torch whose CUDA major is
the container's and TensorRT bindings of the container's TensorRT. Needs the package registry (CI has it); without
it the tests skip and say so.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.images import DOCKER, IMAGES, TRITON_RELEASES, Resolution, name
from tools.paths import PROJECT


def pins(constraints: Path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in constraints.read_text().splitlines()]
    return {name(n): v for n, v in (line.split("==") for line in lines if line)}


def constraints_of(args: list[str]) -> Path:
    return PROJECT / args[args.index("--constraint") + 1]


@pytest.fixture(scope="module")
def resolved(image_resolutions) -> dict[str, list[Resolution]]:
    return image_resolutions()  # started in the background when the session began (tests/conftest.py)


@pytest.mark.parametrize("image", IMAGES)
def test_every_install_line_resolves_with_every_package_pinned(resolved, image):
    assert resolved[image], f"no pip install line found in the {image} image's Dockerfile"
    for args, packages, error in resolved[image]:
        assert packages is not None, f"{image}: pip install {' '.join(args)} does not resolve:\n{error}"
        pinned = pins(constraints_of(args))
        unpinned = sorted(set(packages) - set(pinned) - {"nanochat-triton"})
        assert not unpinned, f"{image}: installed but not pinned in {constraints_of(args).name}: {unpinned}"
        assert all(packages[p] == pinned[p] for p in packages if p in pinned)


def test_every_pin_is_installed_by_some_image(resolved):
    installed: dict[Path, set[str]] = {}
    for lines in resolved.values():
        for args, packages, _ in lines:
            installed.setdefault(constraints_of(args), set()).update(packages or {})
    for constraints, names in installed.items():
        unused = sorted(set(pins(constraints)) - names)
        assert not unused, f"{constraints.name} pins what no image installs: {unused}"


@pytest.mark.parametrize("image", ["triton", "export"])
def test_torch_and_tensorrt_match_the_container(resolved, image):
    release = TRITON_RELEASES[re.search(r"^ARG TRITON_RELEASE=(\S+)$", (DOCKER / "triton.Dockerfile").read_text(),
                                        re.MULTILINE).group(1)]
    major = release.cuda.split(".")[0]
    # the torch the project is tested with (pyproject.toml's core extra)
    tested = re.search(r'"torch==([^"]+)"', (PROJECT / "pyproject.toml").read_text()).group(1)
    for args, packages, _ in resolved[image]:
        assert packages is not None, f"{image}: pip install {' '.join(args)} does not resolve (the test above says why)"
        assert packages["torch"] == tested
        # torch's CUDA is the cuda-toolkit it requires (nvidia-*-cu12 wheels before CUDA 13)
        cuda = packages.get("cuda-toolkit") or packages.get("nvidia-cuda-runtime-cu12") or "none"
        assert cuda.split(".")[0] == major, f"torch is a CUDA {cuda} build; the container is CUDA {release.cuda}"
        bindings = [p for p in packages if p.startswith("tensorrt")]
        assert bindings == [f"tensorrt-cu{major}-bindings"], bindings  # the container's libraries, not a wheel's
        assert packages[bindings[0]] == release.tensorrt
