"""gptkit: train GPT-2-style language models from scratch and put them to use."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gptkit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

from gptkit.api import finetune, info, load, prepare, train  # noqa: E402
from gptkit.errors import GptkitError  # noqa: E402

__all__ = ["GptkitError", "__version__", "finetune", "info", "load", "prepare", "train"]
