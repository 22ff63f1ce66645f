"""One OpenMP team per process: a thread that hands decoding to another thread lets its workers go.

OpenMP keeps a team of worker threads for every thread that has run a parallel region. GNU's
runtime (the one torch ships on Linux) counts the workers of all teams, and once there are more
than the machine's CPUs it stops spinning at barriers and puts threads to sleep at each one: every
barrier of a decoding step then waits for a thread to wake. `gptkit serve` loads the model on the
main thread and decodes on the engine's thread, so it had two teams: on 2 CPUs a one-sequence step
took 2-3 ms longer (GPT-2 124M, 19 against 22 ms). Letting the main thread's workers go (OpenMP
5's `omp_pause_resource_all`) leaves the engine's team alone and spinning.
"""

from __future__ import annotations

import ctypes

OMP_PAUSE_SOFT = 1  # omp_pause_soft in omp.h: threads end; the runtime starts new ones when needed


def release_workers() -> bool:
    """End the OpenMP worker threads this thread started (a later parallel region here starts new
    ones). False where torch's OpenMP runtime has no `omp_pause_resource_all` (before OpenMP 5)."""
    try:
        pause = ctypes.CDLL(None).omp_pause_resource_all
    except (AttributeError, OSError):
        return False
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause(OMP_PAUSE_SOFT) == 0
