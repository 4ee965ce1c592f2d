"""
Writing one model into a Triton model repository (layout: model_repository/README.md), atomically. The model is
staged in a hidden folder beside the target and swapped in by one rename (renameat2 RENAME_EXCHANGE), so Triton only
ever sees the old model or the new one, and a kill at any moment leaves one of them in place, never neither.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from backend.protocol import METADATA_FILE, VERSION, read_metadata

AT_FDCWD, RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>
ASIDE = ".old"  # suffix of an old model moved aside by the fallback of install()
# another host's export folder is left alone for this long: its pid cannot be checked from here
STALE_ELSEWHERE_S = 24 * 3600


class RepositoryError(Exception):
    """The target cannot be written (exists with another model, not writable, ...)."""


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


def check_target(target: Path, checkpoint_path: str, force: bool) -> None:
    """Refuse to replace a different model (or a folder that is not one of ours) without force."""
    if not target.exists() or force:
        return
    try:
        meta = read_metadata(target / VERSION)
    except (OSError, ValueError):
        raise RepositoryError(f"{target} exists and is not a model this exporter wrote; use FORCE=1 (--force) "
                              "to replace it") from None
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


def _stale(folder: Path) -> bool:
    """Whether an export folder's export is dead. Named `<host>-<pid>` (or `<pid>`, this host's, before hosts were
    named): a pid says something only on its own host, since a shared volume sees exports of other containers."""
    host, _, pid = folder.name.removesuffix(ASIDE).split(".export-", 1)[1].rpartition("-")
    if host not in ("", socket.gethostname()):
        return time.time() - folder.stat().st_mtime > STALE_ELSEWHERE_S
    return pid.isdigit() and not _pid_alive(int(pid))


def clean_stale(repo: Path, name: str) -> None:
    """Remove what dead exports of `name` left: staging folders, and old models moved aside, which go back
    into place if the export died before its new model was (the two-rename fallback of install())."""
    for p in repo.glob(f".{name}.export-*"):
        if not _stale(p):
            continue
        if p.name.endswith(ASIDE) and not (repo / name).exists():
            p.rename(repo / name)
        else:
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def staging(repo: Path, name: str) -> Iterator[Path]:
    """A staging model folder next to repo/name (the same filesystem, so renames are atomic), named after this
    host and process so a later export knows it is stale; removed unless `install` moved it into place."""
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RepositoryError(f"cannot create model repository {repo}: {e}") from e
    if not os.access(repo, os.W_OK | os.X_OK):
        raise RepositoryError(f"model repository {repo} is not writable")
    clean_stale(repo, name)
    stage = repo / f".{name}.export-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        (stage / VERSION).mkdir(parents=True)
    except OSError as e:
        raise RepositoryError(f"cannot write in model repository {repo}: {e}") from e
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic rename; False where the kernel or filesystem cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def install(stage: Path, target: Path) -> None:
    """Put the staged model at target. An old model is exchanged with the new one atomically and then
    removed from the staging path; without the exchange it is moved aside first and put back on failure."""
    if not target.exists():
        stage.rename(target)
        return
    if exchange(stage, target):
        shutil.rmtree(stage, ignore_errors=True)  # the old model, now at the staging path
        return
    aside = target.with_name(stage.name + ASIDE)
    target.rename(aside)
    try:
        stage.rename(target)
    except BaseException:
        aside.rename(target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
