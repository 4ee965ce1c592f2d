"""
Writing one model into a Triton model repository, atomically.

Layout and parameters follow model_repository/README.md: <repo>/<name>/config.pbtxt and a version
folder 1/ with the artifacts and metadata.json. The model is assembled in a hidden staging folder
next to the target (same filesystem, so the final rename is atomic) named after the exporting
process; Triton, pointed at the repository, only ever sees the old model or the new one. A staging
folder left by a killed export (its process is gone) is removed by the next export of that name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

VERSION = "1"
METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.pkl"
PLAN_FILE = "model.plan"

INPUTS = [  # name, type, dims, optional
    ("messages", "TYPE_STRING", [1], True),
    ("prompt_ids", "TYPE_INT64", [-1], True),
    ("temperature", "TYPE_FP32", [1], True),
    ("top_k", "TYPE_INT32", [1], True),
    ("max_tokens", "TYPE_INT32", [1], True),
    ("seed", "TYPE_INT64", [1], True),
    ("min_answer_tokens", "TYPE_INT32", [1], True),
]
OUTPUTS = [
    ("text", "TYPE_STRING", [1]),
    ("token_ids", "TYPE_INT64", [-1]),
    ("device_id", "TYPE_INT32", [1]),
    ("finish_reason", "TYPE_STRING", [1]),
    ("prompt_tokens", "TYPE_INT32", [1]),
    ("completion_tokens", "TYPE_INT32", [1]),
    ("dropped_turns", "TYPE_INT32", [1]),
]


class RepositoryError(Exception):
    """The target cannot be written (exists with another model, not writable, ...)."""


def config_pbtxt(name: str, kind: str, parameters: dict[str, object]) -> str:
    """config.pbtxt for the decoupled `nanochat` backend; kind is KIND_CPU or KIND_GPU."""
    dims = lambda d: "[ " + ", ".join(str(x) for x in d) + " ]"
    lines = [f'name: "{name}"', 'backend: "nanochat"', "max_batch_size: 0",
             "model_transaction_policy {", "  decoupled: true", "}", "input ["]
    lines.append(",\n".join(
        f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: {dims(d)}\n    optional: {str(o).lower()}\n  }}'
        for n, t, d, o in INPUTS))
    lines += ["]", "output ["]
    lines.append(",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: {dims(d)}\n  }}'
                            for n, t, d in OUTPUTS))
    lines += ["]", "instance_group [", "  {", "    count: 1", f"    kind: {kind}", "  }", "]"]
    for key, value in parameters.items():
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}')
    return "\n".join(lines) + "\n"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_files(version_dir: Path) -> tuple[dict, str]:
    """{file: {bytes, sha256}} for the artifacts, and one content hash over all of them."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(version_dir.iterdir()) if p.is_file() and p.name != METADATA_FILE}
    content = hashlib.sha256("".join(f"{n}:{f['sha256']}\n" for n, f in files.items()).encode()).hexdigest()
    return files, content


def read_metadata(model_dir: Path) -> dict | None:
    try:
        return json.loads((model_dir / VERSION / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_target(target: Path, checkpoint_path: str, force: bool) -> None:
    """Refuse to replace a different model (or a folder that is not one of ours) without force."""
    if not target.exists() or force:
        return
    meta = read_metadata(target)
    if meta is None:
        raise RepositoryError(f"{target} exists and is not a model this exporter wrote; use FORCE=1 (--force) "
                              "to replace it")
    if meta.get("checkpoint_path") != checkpoint_path:
        raise RepositoryError(f"{target} holds another model (from {meta.get('checkpoint_path')}); use FORCE=1 "
                              "(--force) to replace it, or NAME= to export under another name")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(repo: Path, name: str) -> None:
    for p in repo.glob(f".{name}.export-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def staging(repo: Path, name: str) -> Iterator[Path]:
    """A staging model folder next to repo/name; removed unless `install` moved it into place."""
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RepositoryError(f"cannot create model repository {repo}: {e}") from e
    if not os.access(repo, os.W_OK | os.X_OK):
        raise RepositoryError(f"model repository {repo} is not writable")
    clean_stale(repo, name)
    stage = repo / f".{name}.export-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        (stage / VERSION).mkdir(parents=True)
    except OSError as e:
        raise RepositoryError(f"cannot write in model repository {repo}: {e}") from e
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def install(stage: Path, target: Path) -> None:
    """Move the staged model to target, replacing an old one (kept until the new one is in place)."""
    old = target.with_name(f"{stage.name}.old")
    if target.exists():
        target.rename(old)
    try:
        stage.rename(target)
    except OSError:
        if old.exists():
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
