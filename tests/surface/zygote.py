"""A zygote for tests that run many `gptkit` command lines: one Python process imports gptkit and the
libraries its commands load (torch above all) once, then forks a process per command that runs
`python -m gptkit ARGS` from there, instead of each command paying a fresh interpreter and its imports.

    python zygote.py SOCKET [MODULE ...]

imports the MODULEs (none given: PRELOAD), then listens on the Unix socket SOCKET. zygote_client.py,
put on PATH as `gptkit`, sends its arguments, working folder, environment and standard input, output
and error (the descriptors themselves); a forked handler forks the command's process, waits for it
and answers with its exit code (negative: the signal that ended it). The command's process takes the
descriptors as 0, 1 and 2, the folder, the environment and argv, reseeds Python's and numpy's random
generators as a fresh interpreter would, and runs gptkit's __main__; it ends the way a fresh
interpreter does (atexit handlers, non-daemon threads joined, streams flushed, an uncaught
exception's traceback and 1).

Forking is only sound while no other thread of this process is midway through anything (a thread pool
would be copied half alive), so the zygote checks its threads before every fork and stops, saying so,
if an import started one that no fork handler takes care of.
Libraries read their environment variables when imported, so the zygote must be started with the
environment the commands get (they run under `bash -c`, which adds only PWD, SHLVL and `_`).
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import importlib
import json
import os
import random
import runpy
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NoReturn

# What several of the README's commands import (a module only one command uses gains nothing here); one
# missing (an extra not installed) is skipped: the command that needs it fails as it would anyway.
PRELOAD = (
    "torch",
    "numpy",
    "matplotlib.figure",
    "matplotlib.ticker",
    "gptkit.cli",
    "gptkit.api",
    "gptkit.data.prepare",
    "gptkit.training.trainer",
    "gptkit.training.runlog",
    "gptkit.finetuning.methods",
    "gptkit.generate.textmodel",
    "gptkit.generate.sampler",
    "gptkit.generate.chat",
    "gptkit.eval.run",
    "gptkit.interop.hf",
    "gptkit.rag.indexing",
    "gptkit.rag.retriever",
    "transformers",
    "sentence_transformers",
    "faiss",
)
HEADER = struct.Struct("!I")  # the length of the JSON request that follows
STATUS = struct.Struct("!i")  # the reply: the command's exit code, or minus the signal that ended it
STREAMS = 3  # standard input, output and error
# Threads that may run when the zygote forks: jemalloc's (the allocator of pyarrow, which
# sentence-transformers imports) holds its locks across a fork and stops its background thread in the
# child. OpenBLAS's pools (numpy's, scipy's) are not here: its fork handler ends them (see settle).
FORK_SAFE_THREADS = {"jemalloc_bg_thd"}


def preload(names: list[str]) -> list[str]:
    """Import the modules named; the names that could not be imported."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def settle() -> None:
    """Fork once, so that the libraries' fork handlers stop the thread pools they stop for a fork."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def check_threads() -> None:
    """Refuse to fork with a thread whose state a child would inherit half made."""
    tasks = [task for task in os.listdir("/proc/self/task") if int(task) != os.getpid()]
    names = [Path(f"/proc/self/task/{task}/comm").read_text().strip() for task in tasks]
    unsafe = [name for name in names if name not in FORK_SAFE_THREADS]
    if unsafe:
        raise SystemExit(f"zygote: threads {unsafe} besides the main one; forking would be unsound")


def serve(listener: socket.socket) -> socket.socket:
    """Accept requests, forking a handler for each; returns (in the handler) its connection."""
    while True:
        conn, _ = listener.accept()
        reap()
        check_threads()
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            listener.close()
            return conn
        conn.close()


def reap() -> None:
    """Collect the handlers that have ended (no SIGCHLD handler: commands inherit its disposition)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """The request (argv, cwd, env) and the client's standard stream descriptors."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, STREAMS)
    if len(fds) != STREAMS or len(data) < HEADER.size:
        raise SystemExit(f"zygote: a request without its {STREAMS} descriptors")
    size = HEADER.unpack_from(data)[0]
    data = data[HEADER.size :]
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise SystemExit("zygote: the request was cut short")
        data += chunk
    return json.loads(data), fds


def run_command(conn: socket.socket) -> None:
    """In the handler: fork the command's process and return there, set up as the client; the handler
    itself waits, answers with the exit status and leaves."""
    request, fds = receive(conn)
    pid = os.fork()
    if pid == 0:
        take_over(request, fds)
        conn.close()
        return
    for fd in fds:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    conn.sendall(STATUS.pack(os.waitstatus_to_exitcode(status)))
    conn.close()
    os._exit(0)


def take_over(request: dict, fds: list[int]) -> None:
    """Become the client's process: its streams, folder, environment and argv, fresh random state."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = request["cwd"]  # what `python -m` puts first
    sys.argv = ["gptkit", *request["argv"]]
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()


def run_gptkit() -> NoReturn:
    """`python -m gptkit` in the command's process, ended as an interpreter ends (non-daemon threads
    joined, atexit handlers run, streams flushed, an uncaught exception's traceback and 1) but without
    tearing down each module the zygote imported: that writes to their pages, copying them all (about
    2 s a command)."""
    try:
        runpy.run_module("gptkit", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = exit_code(e.code)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # what the interpreter calls at exit: wait for the non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def exit_code(code: object) -> int:
    """The exit status of `sys.exit(code)`, as the interpreter makes it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def end_with_parent() -> None:
    """Be ended (SIGTERM) when the test process that started this zygote ends, even by SIGKILL, so that
    no zygote outlives its test session (Linux's PR_SET_PDEATHSIG; forked commands do not inherit it)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent ended before the call
        sys.exit("zygote: the test process that started it has ended")


def main(path: str, modules: list[str]) -> None:
    end_with_parent()
    missing = preload(modules)
    if missing:
        print(f"zygote: not preloaded (not installed): {', '.join(missing)}", file=sys.stderr)
    gc.freeze()  # the commands' collections then leave the zygote's objects (and pages) alone
    settle()
    check_threads()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".part")
    listener.listen(16)
    os.rename(path + ".part", path)  # the socket appears when the zygote is ready
    run_command(serve(listener))
    run_gptkit()


@contextmanager
def serving(bin_dir: Path, cwd: Path, env: dict[str, str], modules: Sequence[str] = ()) -> Iterator[None]:
    """While the block runs: a zygote started in `cwd` with `env` (which should put `bin_dir` first on
    PATH) and `bin_dir`/gptkit its client. Its socket and its log (shown if it cannot start) are
    `bin_dir`/zygote.sock and zygote.log; it ends with the block, with any command still running."""
    sock, log_path = bin_dir / "zygote.sock", bin_dir / "zygote.log"
    sock.unlink(missing_ok=True)  # an earlier zygote's: it would look ready
    client = Path(__file__).with_name("zygote_client.py")
    (bin_dir / "gptkit").write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{client}" "{sock}" "$@"\n')
    (bin_dir / "gptkit").chmod(0o755)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, __file__, str(sock), *modules],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group of its own: the commands' processes are in it
        )
    try:
        deadline = time.monotonic() + 300
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the zygote did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield
    finally:
        with suppress(ProcessLookupError):  # it may have ended already, with none of its commands left
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(PRELOAD))
