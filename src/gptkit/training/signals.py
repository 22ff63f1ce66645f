"""Graceful stops: the first SIGINT/SIGTERM asks the loop to stop after the current step; a second
Ctrl+C exits at once."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

from gptkit.console import notice


class StopRequest:
    """Installs the handlers while active (main thread only) and restores the old ones after."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            notice("second interrupt: exiting now, without a checkpoint")
            os._exit(130)
        self.requested = True
        name = signal.Signals(signum).name
        notice(f"{name}: finishing this step, then saving a checkpoint (Ctrl+C again to exit at once)")
