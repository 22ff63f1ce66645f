"""One OpenMP team per server: the thread that loaded the model lets its workers go when the engine
starts, so that GNU OpenMP keeps spinning at the engine's barriers (`gptkit.generate.cpu.threads`).
Counted as the process's threads, in a fresh interpreter (the test process has teams of its own)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from serve.servers import char_checkpoint

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir(), reason="counts threads in /proc/self/task (Linux only)"
)

COUNT = "import os\ndef threads() -> int:\n    return len(os.listdir('/proc/self/task'))\n"

RELEASE = (
    COUNT
    + """
import torch
from gptkit.generate.cpu.threads import release_workers
torch.set_num_threads(2)
before = threads()
torch.randn(1 << 22).exp()  # a parallel region: this thread's team, one worker
team = threads()
released = release_workers()
print(before, team, released, threads())
torch.randn(1 << 22).exp()  # a new team when needed
print(threads())
"""
)

ENGINE = (
    COUNT
    + """
import asyncio, sys, torch
import gptkit
from gptkit.generate.settings import SampleSettings
from gptkit.serve.engine import Engine
from gptkit.serve.metrics import Metrics

torch.set_num_threads(2)
model = gptkit.load(sys.argv[1], device="cpu")
torch.randn(1 << 22).exp()  # the loading thread has a team


async def main() -> None:
    engine = Engine(model.sampler, max_batch=2, max_queue=2, metrics=Metrics())
    before = threads()
    engine.start()
    job = engine.submit([[5, 6, 7]], SampleSettings(max_new_tokens=8, temperature=0), 1)
    while not any(e.finish_reason for e in await job.events.get()):
        pass
    print(before, threads())
    engine.stop()


asyncio.run(main())
"""
)


def run(script: str, *args: str) -> list[list[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # every thread's teams: one worker, on any machine
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr
    return [line.split() for line in done.stdout.splitlines()]


def test_release_workers_ends_this_threads_team() -> None:
    (before, team, released, after), (again,) = run(RELEASE)
    assert released == "True"
    assert int(team) == int(before) + 1  # the worker the parallel region started
    assert int(after) == int(before)  # gone
    assert int(again) == int(before) + 1  # and started again by the next region


def test_the_engine_decodes_with_the_only_team(tmp_path: Path) -> None:
    ckpt = char_checkpoint(tmp_path / "m.pt", None)
    ((before, decoding),) = run(ENGINE, str(ckpt))
    # the loading thread's worker went; the engine's thread and its one worker came
    assert int(decoding) == int(before) - 1 + 2
