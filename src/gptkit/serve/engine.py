"""The engine: one thread owns the model and runs the one generation loop for every request.

Requests arrive through `submit` from the server's event loop; the engine thread adds their
sequences to its `Decoding` (they join the running batch at its next step, each with its own slot,
settings, generator and stop rules) and sends each step's results back to the request's asyncio
queue. A thread, not an asyncio task: a step is seconds of blocking compute at worst, during which
the event loop keeps answering (health checks, keep-alives, new requests). A request that is
cancelled (its client went away) leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from gptkit.errors import GptkitError
from gptkit.generate.cpu.threads import release_workers
from gptkit.generate.decoding import Decoding, Sequence, Step, row_seeds
from gptkit.generate.sampler import Sampler
from gptkit.generate.settings import SampleSettings
from gptkit.serve.metrics import Metrics

PREFILL_CHUNK = 128  # prompt positions run per step while other sequences decode


class QueueFull(Exception):
    """More requests wait than the engine's queue holds: the server answers 429."""


@dataclass
class Event:
    """What one step gave one choice of a request (`error` set: the engine failed, nothing follows)."""

    index: int  # the choice: prompt i, sample j -> i * n + j
    token: int | None = None
    text: str = ""
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Job:
    """One request: its prompts (token ids), settings and `n` samples of each; results in `events`."""

    prompts: list[list[int]]
    settings: SampleSettings
    n: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[list[Event]] = field(default_factory=asyncio.Queue)
    sequences: list[Sequence] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    started: bool = False  # a first token came (it left the queue)
    cancelled: bool = False
    finished: int = 0  # choices that ended

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    def cancel(self) -> None:
        """The client went away: its sequences leave the batch at the next step (from any thread)."""
        self.cancelled = True
        for s in self.sequences:
            s.cancel()


class Engine:
    """Up to `max_batch` sequences decode together; up to `max_queue` requests wait for room."""

    def __init__(self, sampler: Sampler, max_batch: int, max_queue: int, metrics: Metrics) -> None:
        self.sampler = sampler
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics
        self.decoding = self._new_decoding()
        self._inbox: deque[Job] = deque()
        self._waiting: set[Job] = set()  # submitted, no token yet
        self._owner: dict[Sequence, tuple[Job, int]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gptkit-engine", daemon=True)
        self._last_token: dict[Sequence, float] = {}

    def _new_decoding(self) -> Decoding:
        return self.sampler.decoding(self.max_batch, chunk=PREFILL_CHUNK)

    def start(self) -> None:
        """Start the engine's thread (call from the thread that loaded the model: its OpenMP workers
        go, so that the engine's are the only ones; see `gptkit.generate.cpu.threads`)."""
        release_workers()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    @property
    def queued(self) -> int:
        """Requests waiting for their first token."""
        with self._lock:
            return len(self._waiting)

    def submit(self, prompts: list[list[int]], settings: SampleSettings, n: int) -> Job:
        """Queue a request (from the event loop's thread); QueueFull when `max_queue` already wait."""
        job = Job(prompts, settings, n, asyncio.get_running_loop())
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting, the most this server queues")
            self._waiting.add(job)
            self._inbox.append(job)
        self.metrics.queued.set(len(self._waiting))
        self._wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: the request leaves the queue now and the batch at the next step."""
        job.cancel()
        self._forget(job)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._take_new()
                if not self.decoding.busy:
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                self._deliver(self.decoding.step())
            except Exception as e:  # a failed step fails every request in it; the engine goes on
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")

    def _take_new(self) -> None:
        with self._lock:
            new, self._inbox = list(self._inbox), deque()
        for job in new:
            if job.cancelled:
                self._forget(job)
                continue
            seeds = row_seeds(job.settings.seed, job.choices)
            for i, prompt in enumerate(job.prompts):
                try:
                    sequences = self.decoding.add(prompt, job.settings, seeds[i * job.n : (i + 1) * job.n])
                except GptkitError as e:  # the app checks first; never let a request stop the engine
                    job.cancel()
                    self._forget(job)
                    job.loop.call_soon_threadsafe(job.events.put_nowait, [Event(0, error=str(e))])
                    break
                for j, s in enumerate(sequences):
                    self._owner[s] = (job, i * job.n + j)
                job.sequences += sequences
            if job.cancelled:  # cancelled while its sequences were being added
                job.cancel()

    def _deliver(self, steps: list[Step]) -> None:
        now = time.perf_counter()
        out: dict[Job, list[Event]] = {}
        for step in steps:
            job, index = self._owner[step.sequence]
            if step.token is not None:
                self._timing(job, step.sequence, now)
            event = Event(index, step.token, step.text, step.logprob, step.top_logprobs, step.finish_reason)
            if step.finish_reason is not None:
                self._owner.pop(step.sequence)
                self._last_token.pop(step.sequence, None)
                job.finished += 1
            out.setdefault(job, []).append(event)
        for job, events in out.items():
            if job.finished == job.choices:
                self._forget(job)
            job.loop.call_soon_threadsafe(job.events.put_nowait, events)
        self.metrics.active.set(len(self.decoding.slots.owners))
        self.metrics.completion_tokens.inc(sum(s.token is not None for s in steps))

    def _timing(self, job: Job, s: Sequence, now: float) -> None:
        if not job.started:
            job.started = True
            self.metrics.ttft.observe(now - job.submitted)
            with self._lock:
                self._waiting.discard(job)
            self.metrics.queued.set(len(self._waiting))
        if s in self._last_token:
            self.metrics.inter_token.observe(now - self._last_token[s])
        self._last_token[s] = now

    def _forget(self, job: Job) -> None:
        with self._lock:
            self._waiting.discard(job)
        self.metrics.queued.set(len(self._waiting))

    def _fail_all(self, message: str) -> None:
        jobs = {job for job, _ in self._owner.values()}
        self._owner.clear()
        self._last_token.clear()
        self.decoding = self._new_decoding()
        for job in jobs:
            self._forget(job)
            job.loop.call_soon_threadsafe(job.events.put_nowait, [Event(0, error=message)])
        self.metrics.active.set(0)
