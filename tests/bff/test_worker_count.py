"""
gunicorn's default worker count (bff/settings.py): the container's CPU quota from fake cgroup files (v2's
cpu.max, else v1's CFS files), else the affinity mask, never past the cap; BFF_WORKERS wins over all of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bff.settings import MAX_DEFAULT_WORKERS, cpu_quota, from_env


def v2(root: Path, text: str) -> str:
    (root / "cpu.max").write_text(text)
    return str(root)


def v1(root: Path, quota: str, period: str = "100000") -> str:
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(period + "\n")
    return str(root)


@pytest.mark.parametrize(("text", "cpus"), [("max 100000\n", None), ("200000 100000\n", 2),
                                            ("150000 100000\n", 2), ("10000 100000\n", 1)])
def test_cgroup_v2_quota_rounds_up(tmp_path, text, cpus):
    assert cpu_quota(v2(tmp_path, text)) == cpus


@pytest.mark.parametrize(("quota", "cpus"), [("-1", None), ("300000", 3), ("50000", 1)])
def test_cgroup_v1_quota_when_v2_is_absent(tmp_path, quota, cpus):
    assert cpu_quota(v1(tmp_path, quota)) == cpus


def test_no_cgroup_files_is_no_quota(tmp_path):
    assert cpu_quota(str(tmp_path)) is None


def test_worker_count_follows_the_quota_then_the_mask_under_the_cap(tmp_path):
    settings = from_env({}, run_open=True)
    assert settings.worker_count(v2(tmp_path, "300000 100000")) == min(3, MAX_DEFAULT_WORKERS)
    v2(tmp_path, f"{(MAX_DEFAULT_WORKERS + 5) * 100000} 100000")
    assert settings.worker_count(str(tmp_path)) == MAX_DEFAULT_WORKERS
    v2(tmp_path, "max 100000")
    assert settings.worker_count(str(tmp_path)) == min(len(os.sched_getaffinity(0)), MAX_DEFAULT_WORKERS)
    assert from_env({"BFF_WORKERS": "12"}, run_open=True).worker_count(v2(tmp_path, "100000 100000")) == 12
