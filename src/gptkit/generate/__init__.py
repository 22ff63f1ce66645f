"""Generation: the one sampler, its settings, and text streaming."""

from gptkit.generate.chat import Chat
from gptkit.generate.sampler import Piece, Sampler
from gptkit.generate.settings import SampleSettings
from gptkit.generate.text import TextStream
from gptkit.templates import ChatTemplate

__all__ = ["Chat", "ChatTemplate", "Piece", "SampleSettings", "Sampler", "TextStream"]
