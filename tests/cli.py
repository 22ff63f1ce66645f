"""`gptkit` command lines for the tests, each a process of its own: forked from one zygote per test
session that imported torch and gptkit once (surface/zygote.py), where the system has fork and /proc,
instead of a fresh interpreter paying about 3 s of imports per command. The zygote starts with the
first command and ends with the session (conftest.py's pytest_sessionfinish)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from surface.zygote import serving

_zygote = ExitStack()
_command: list[str] = []
# the zygote's environment: the session's as it started (libraries read theirs when imported), not
# that of the test that happens to run the first command
_STARTING_ENV = dict(os.environ)


def gptkit_command() -> list[str]:
    """The argv that runs `gptkit`: the session's zygote client, or `python -m gptkit` without one."""
    if not _command:
        if hasattr(os, "fork") and Path("/proc/self/task").is_dir():
            bin_dir = Path(tempfile.mkdtemp(prefix="gptkit-zygote-"))
            _zygote.callback(shutil.rmtree, bin_dir, ignore_errors=True)  # after the zygote ends
            _zygote.enter_context(serving(bin_dir, bin_dir, _STARTING_ENV))
            _command.append(str(bin_dir / "gptkit"))
        else:
            _command.extend([sys.executable, "-m", "gptkit"])
    return _command


def gptkit_cli(
    *args: str | Path,
    stdin: str = "",
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run `gptkit ARGS` to its end, with this process's environment unless `env` is given."""
    return subprocess.run(
        [*gptkit_command(), *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def stop() -> None:
    """End the session's zygote (and any command it still runs)."""
    _zygote.close()
    _command.clear()
