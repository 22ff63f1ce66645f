"""Generation: the one sampler, its settings, and text streaming.

Names are imported on first use (PEP 562), so that `gptkit.generate.settings` (the CLI's sampling
defaults) can be read without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gptkit.generate.chat import Chat, ChatTemplate
    from gptkit.generate.decoding import Decoding, Sequence, Step
    from gptkit.generate.sampler import Piece, Sampler
    from gptkit.generate.settings import SampleSettings
    from gptkit.generate.text import TextStream

_HOMES = {
    "Chat": "chat",
    "ChatTemplate": "chat",
    "Decoding": "decoding",
    "Sequence": "decoding",
    "Step": "decoding",
    "Piece": "sampler",
    "Sampler": "sampler",
    "SampleSettings": "settings",
    "TextStream": "text",
}

__all__ = [
    "Chat",
    "ChatTemplate",
    "Decoding",
    "Piece",
    "SampleSettings",
    "Sampler",
    "Sequence",
    "Step",
    "TextStream",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'gptkit.generate' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gptkit.generate.{_HOMES[name]}"), name)
