"""Training in several processes under torchrun: DDP or FSDP2, with the results of one process.

`torchrun --nproc_per_node=N -m gptkit train CONFIG` starts N copies of `gptkit train`; each learns
its rank from the environment torchrun sets. Every rank draws the same global batch and trains on
its own slice (gptkit.data.batches), gradients are averaged across ranks, and so N processes with
micro-batch B take the same steps as one process with micro-batch N x B. Only rank 0 prints, logs
and writes files; checkpoints hold full (unsharded) states, so a run saved by N processes resumes
with any number of processes, or loads into a plain model.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gptkit.runtime import Processes


def start(procs: Processes, device: torch.device, timeout_minutes: float) -> None:
    """Join the process group: nccl between GPUs, gloo between CPUs. A rank that hangs in a collective
    makes the others fail after `timeout_minutes` instead of waiting forever."""
    if not procs.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=dt.timedelta(minutes=timeout_minutes))


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, procs: Processes, device: torch.device) -> nn.Module:
    """The model as the training step calls it: DDP-wrapped, or sharded in place with fully_shard
    (each block, then the root, so that one block's parameters are gathered at a time)."""
    if not procs.distributed:
        return model
    if procs.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, procs: Processes, sync: bool) -> Iterator[None]:
    """Gradient accumulation: average gradients across ranks on the last micro-batch only."""
    if not procs.distributed or sync:
        if procs.strategy == "fsdp" and procs.distributed:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]
        yield
    elif procs.strategy == "fsdp":
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        yield
    else:
        with model.no_sync():  # type: ignore[operator]
            yield


def mean(value: Tensor, procs: Processes) -> Tensor:
    """The mean over all ranks of a scalar or a few (elementwise; every rank gets it)."""
    if not procs.distributed:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / procs.world_size


def total_counts(counts: list[int], procs: Processes, device: torch.device) -> list[int]:
    """Each count summed over the ranks, exactly (integers; every rank gets them): one all_reduce."""
    if not procs.distributed:
        return counts
    t = torch.tensor(counts, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [int(v) for v in t.tolist()]


def any_rank(flags: list[bool], procs: Processes, device: torch.device) -> list[bool]:
    """Each flag OR-ed over the ranks: decisions (stop, save) every rank must take together."""
    if not procs.distributed:
        return flags
    t = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def gather(obj: Any, procs: Processes) -> list[Any]:
    """Every rank's `obj`, in rank order (e.g. their random generator states)."""
    if not procs.distributed:
        return [obj]
    out: list[Any] = [None] * procs.world_size
    dist.all_gather_object(out, obj)
    return out


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, procs: Processes
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Unsharded model and optimiser states keyed by parameter name (complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=procs.distributed)
    return get_state_dict(model, optimizer, options=options)


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any],
    optim_state: dict[str, Any] | None,
) -> None:
    """Load full states on every rank; a sharded model keeps only its own shards. Without an
    optimiser state (a weights-only checkpoint) the optimiser keeps its fresh state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_state_dict,
    )

    if optim_state is None:
        set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
        return
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=StateDictOptions(full_state_dict=True),
    )
