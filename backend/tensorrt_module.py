"""
TensorRT's Python API under either of its package names, and a check that it runs on the TensorRT it was built for.
NVIDIA's `tensorrt` wheel (libraries included, from NVIDIA's index) imports as `tensorrt`; the images install PyPI's
binary `tensorrt-cu13-bindings` over the TensorRT libraries of the Triton container, which imports as
`tensorrt_bindings`. The bindings load whatever libnvinfer the system has, so the images check the two agree.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

NAMES = ("tensorrt", "tensorrt_bindings")


def installed() -> bool:
    return any(name in sys.modules or importlib.util.find_spec(name) is not None for name in NAMES)


def import_tensorrt() -> ModuleType:
    """The tensorrt module; ImportError naming both packages when neither is installed."""
    for name in NAMES:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # the package is there but something it needs is not: say that
                raise
    raise ImportError("TensorRT's Python API is not installed: pip install '.[tensorrt]' (NVIDIA's wheel), or "
                      "tensorrt-cu13-bindings over a system TensorRT (the images)")


def library_version(maps: str) -> str | None:
    """The version of the libnvinfer mapped into a process (/proc/<pid>/maps text), from its file name
    (libnvinfer.so.10.13.3: the packages name the real file by major.minor.patch)."""
    for line in maps.splitlines():
        if m := re.search(r"/libnvinfer\.so\.(\d+\.\d+\.\d+)\S*$", line):
            return m.group(1)
    return None


def check_library(maps_path: Path = Path("/proc/self/maps")) -> str:
    """Import TensorRT and check that the libnvinfer this process loaded is the release its bindings were built
    for; returns the version. Run at image build time, where a mismatch would otherwise surface at the first
    engine build or load."""
    trt = import_tensorrt()
    loaded = library_version(maps_path.read_text())
    if loaded is None:
        raise RuntimeError(f"tensorrt {trt.__version__} is imported but no libnvinfer.so.<version> is mapped")
    if not trt.__version__.startswith(loaded + ".") and trt.__version__ != loaded:
        raise RuntimeError(f"the TensorRT Python API is {trt.__version__} but the system's libnvinfer is {loaded}: "
                           f"pin the bindings of the container's TensorRT (docker/constraints-gpu.txt)")
    return trt.__version__
