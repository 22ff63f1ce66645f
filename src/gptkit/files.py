"""Writing files so that a crash at any moment leaves the old version or the new, never half of one."""

from __future__ import annotations

import os
from pathlib import Path


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
