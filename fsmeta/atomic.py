"""Write-then-rename, so that no reader ever sees a half-written file and an interrupted
write leaves the previous version (or nothing) behind."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from fsmeta.errors import FsmetaError


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    The temporary name keeps ``path``'s extension, for writers that choose a format
    by it; the result is readable by others (0644), like any output file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_files(path)
    # The pid in the name lets a later write tell a killed writer's leftover from a live one's.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# Temporaries named without their writer's pid are taken for stale once this old.
LEGACY_STALE_S = 24 * 3600


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0  # another user's process, or a number no process can have
    return pid > 0


def sweep_stale(folder: Path, prefix: str, files_containing: str = "") -> list[Path]:
    """Remove ``folder/PREFIX<pid>-*`` temporaries whose writing process is gone.

    A SIGKILL mid-write leaves its temporary behind; the pid in its name tells a
    live writer's from a dead one's, so a concurrent write is never disturbed.
    Temporaries from before pids were in the names go once a day old. Returns
    what was removed.
    """
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if not p.name.startswith(prefix) or files_containing not in p.name:
            continue
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit():
            if _pid_alive(int(pid)):
                continue
        elif time.time() - p.lstat().st_mtime < LEGACY_STALE_S:
            continue  # a name without a pid (earlier fsmeta versions wrote those): only once it is old
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def sweep_stale_files(path: Path) -> None:
    """Remove temporaries of ``path`` left by writers that were killed (SIGKILL, power loss)."""
    sweep_stale(path.parent, f".{path.name}.", files_containing=".tmp")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` atomically and durably (flushed to disk before the rename)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def path_inside(folder: str | Path, name: str) -> Path:
    """``folder / name``, refusing a name that would land anywhere but directly inside ``folder``."""
    folder = Path(folder)
    path = folder / name
    if Path(name).name != name or name in ("", ".", "..") or path.resolve().parent != folder.resolve():
        raise FsmetaError(f"output name {name!r} would be written outside {folder}; refusing it")
    return path
