"""Generation: the one sampler, its settings, and text streaming.

The names are imported on first use (PEP 562), so `gptkit.generate.settings`, which the CLI's
parser reads for its defaults, is had without torch: `gptkit --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gptkit.generate.chat import Chat, ChatTemplate
    from gptkit.generate.sampler import Piece, Sampler
    from gptkit.generate.settings import SampleSettings
    from gptkit.generate.text import TextStream

_MODULES = {
    "Chat": "chat",
    "ChatTemplate": "chat",
    "Piece": "sampler",
    "Sampler": "sampler",
    "SampleSettings": "settings",
    "TextStream": "text",
}
__all__ = ["Chat", "ChatTemplate", "Piece", "SampleSettings", "Sampler", "TextStream"]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"gptkit.generate.{_MODULES[name]}"), name)
