"""A training batch: what every data source gives the trainer (shard windows, instruction examples)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gptkit.model import Layout, attention_layout


@dataclass(frozen=True)
class Batch:
    """Token ids (B, T), their next-token targets (B, T; IGNORE_INDEX where nothing is learnt), and
    for rows packed with several examples their `segments` (B, T): equal ids are one example."""

    ids: Tensor
    targets: Tensor
    segments: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        ids, targets, segments = (
            None if t is None else t.to(device, non_blocking=non_blocking)
            for t in (self.ids, self.targets, self.segments)
        )
        assert ids is not None and targets is not None
        return Batch(ids, targets, segments)

    def layout(self) -> Layout | None:
        """The attention mask and positions that keep packed examples apart (None: plain rows)."""
        if self.segments is None:
            return None
        return attention_layout(self.ids.size(1), self.ids.device, segments=self.segments)
