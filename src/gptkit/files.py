"""Writing files so that a crash at any moment leaves the old version or the new, never half of one."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from gptkit.locks import alive

TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")  # `.NAME.tmp-PID`: write_atomic's, checkpoint saves'


def write_atomic(path: Path, data: bytes | str, durable: bool = False) -> None:
    """Temporary file beside `path`, then rename. `durable` also fsyncs the file and its folder,
    so the new version survives a power cut, not only a crash of this process."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            f.write(raw)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # named after the file it was for, not its temporary
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status), since
    setting it to read it would race with other threads creating files."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_modes(path: Path, executable: bool = False) -> None:
    """Give `path` (a file, or a folder and everything in it) the mode a plain `open` or `mkdir`
    would: writers such as safetensors or mkstemp create files 0600, which then differ from their
    neighbours once renamed into place. `executable`: files get the execute bits too."""
    mask = umask()
    file_mode = (0o777 if executable else 0o666) & ~mask
    if path.is_dir():
        for child in path.rglob("*"):
            os.chmod(child, (0o777 & ~mask) if child.is_dir() else file_mode)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, file_mode)


def remove_orphans(folder: Path) -> list[Path]:
    """Delete the temporaries (`.NAME.tmp-PID`) that killed writers left in `folder`: those whose
    process is gone. A live writer's temporary is kept. Returns what was removed."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        m = TEMPORARY.match(path.name)
        if m and int(m.group(1)) != os.getpid() and not alive(int(m.group(1))) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def left_by_dead(path: Path, tag: str) -> list[Path]:
    """The `.NAME.TAG-PID` files or folders beside `path` whose process is gone: what writers of
    `path` that were killed left (a live writer's, and this process's own, are not listed)."""
    if not path.parent.is_dir():
        return []
    found = []
    for stale in sorted(path.parent.glob(f".{path.name}.{tag}-*")):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
            found.append(stale)
    return found


def remove_dead_partials(path: Path) -> list[Path]:
    """Delete the `.NAME.partial-PID` files or folders beside `path` that killed writers of `path`
    left (their process is gone). Returns what was removed."""
    removed = left_by_dead(path, "partial")
    for stale in removed:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return removed
    for stale in path.parent.glob(f".{path.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed
