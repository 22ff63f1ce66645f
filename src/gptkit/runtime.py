"""Where and how one run computes: its processes, device and precision, resolved once and passed down.

`gptkit train` resolves them at its start (the device before the process group is joined, the
precision once the model's shape is known: "auto" depends on its width) and hands the result to
the batch-size search, the trainer and its evaluations, which all read the same answer.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from gptkit.config import ModelConfig, TrainConfig
from gptkit.device import autocast, pick_device, pick_precision
from gptkit.errors import GptkitError


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    strategy: str = "ddp"  # or "fsdp": parameters, gradients and optimiser state sharded

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def from_environment(strategy: str = "ddp") -> Processes:
    """The ranks torchrun (or SLURM via torchrun) put in the environment; one process without them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(strategy=strategy)
    try:
        return Processes(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), world, strategy)
    except (KeyError, ValueError):
        raise GptkitError(
            "WORLD_SIZE is set but RANK/LOCAL_RANK are not; start several processes with torchrun"
        ) from None


def process_device(name: str, procs: Processes) -> torch.device:
    """The device `name` ("auto", "cuda", ...) means for this process (its own GPU among several)."""
    return pick_device(name, procs.local_rank if procs.distributed else None)


@dataclass(frozen=True)
class Runtime:
    """A run's resolved processes, device and precision ("fp32", "bf16" or "fp16": never "auto")."""

    procs: Processes
    device: torch.device
    precision: str

    @property
    def autocast_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Mixed precision for forward passes (a no-op in fp32)."""
        return autocast(self.device, self.precision)


def resolve_runtime(
    train: TrainConfig, model: ModelConfig, procs: Processes | None = None, device: torch.device | None = None
) -> Runtime:
    """The config's device and precision for this model; `device` if the caller resolved it already."""
    procs = procs or Processes()
    device = device if device is not None else process_device(train.device, procs)
    return Runtime(procs, device, pick_precision(train.precision, device, model))
