"""One writer per output: a lock file beside what is written, and whether a process still lives.

`hold(path, what)` takes an exclusive `flock` on `.NAME.lock` beside `path` for as long as the
context is open, and writes its PID into the file. The OS drops the lock when the process dies,
however it dies, so a killed run never blocks the next one; a live holder is named in a one-line
error. The lock file itself stays (deleting it would let two processes lock two different files).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gptkit.errors import GptkitError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; writers are then not kept apart
    fcntl = None  # type: ignore[assignment]


def alive(pid: int) -> bool:
    """Whether process `pid` exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


@contextmanager
def hold(path: str | Path, what: str) -> Iterator[None]:
    """Hold the lock of `path` (`what` names it in the error, e.g. "run folder 'runs/x'").

    Another holder is a GptkitError naming its PID; a lock file that cannot be made (an unwritable
    folder) is the OSError, so that a caller with nothing to write yet can go on without the lock."""
    file = lock_path(Path(path))
    if fcntl is None:
        yield
        return
    file.parent.mkdir(parents=True, exist_ok=True)  # an OSError here is the caller's to word
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise GptkitError(
                f"{what} is in use by another gptkit process (PID {holder}); wait for it to finish or "
                "stop it, or choose another output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the lock
