"""
backend/tensorrt_module.py: TensorRT's API under either package name, and the image build's check that the bindings
run on the TensorRT release they were built for (read from a process's memory map, as /proc/self/maps has it).
"""

from __future__ import annotations

import sys
import types

import pytest

from backend import tensorrt_module

# Lines as Linux writes them for a process that imported PyPI's bindings over Ubuntu's TensorRT packages.
MAPS = """\
7f1c2a000000-7f1c2a200000 r--p 00000000 08:01 1234 /usr/lib/python3.12/dist-packages/tensorrt_bindings/tensorrt.so
7f1c30000000-7f1c31000000 r--p 00000000 08:01 2345 /usr/lib/x86_64-linux-gnu/libnvinfer_plugin.so.10.13.3
7f1c40000000-7f1c48000000 r-xp 00000000 08:01 3456 /usr/lib/x86_64-linux-gnu/libnvinfer.so.10.13.3
7f1c50000000-7f1c50001000 rw-p 00000000 00:00 0
"""


def fake(monkeypatch, name: str, version: str) -> None:
    module = types.ModuleType(name)
    module.__version__ = version
    for other in tensorrt_module.NAMES:
        monkeypatch.delitem(sys.modules, other, raising=False)
    monkeypatch.setitem(sys.modules, name, module)


def test_the_loaded_library_version_is_read_from_the_map():
    assert tensorrt_module.library_version(MAPS) == "10.13.3"  # libnvinfer, not its plugin library
    assert tensorrt_module.library_version(MAPS.replace("libnvinfer.so.10.13.3", "libnvinfer.so.10")) is None


@pytest.mark.parametrize("name", tensorrt_module.NAMES)
def test_either_package_name_is_imported(monkeypatch, name):
    fake(monkeypatch, name, "10.13.3.9")
    assert tensorrt_module.installed()
    assert tensorrt_module.import_tensorrt().__version__ == "10.13.3.9"


def test_the_check_passes_on_the_same_release_and_names_both_on_another(monkeypatch, tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(MAPS)
    fake(monkeypatch, "tensorrt_bindings", "10.13.3.9")
    assert tensorrt_module.check_library(maps) == "10.13.3.9"
    fake(monkeypatch, "tensorrt_bindings", "10.9.0.34")
    with pytest.raises(RuntimeError, match=r"API is 10\.9\.0\.34 but the system's libnvinfer is 10\.13\.3"):
        tensorrt_module.check_library(maps)
    maps.write_text(MAPS.replace("libnvinfer.so.10.13.3", "libnvinfer.so.10"))
    with pytest.raises(RuntimeError, match="no libnvinfer"):
        tensorrt_module.check_library(maps)


def test_without_tensorrt_the_error_names_both_packages(monkeypatch):
    if tensorrt_module.installed():
        pytest.skip("TensorRT is installed here")
    with pytest.raises(ImportError, match="tensorrt-cu13-bindings"):
        tensorrt_module.import_tensorrt()
