"""gptkit: train GPT-2-style language models from scratch and put them to use."""

from gptkit.api import (
    evaluate,
    export_model,
    finetune,
    import_model,
    info,
    load,
    prepare,
    train,
)
from gptkit.errors import GptkitError
from gptkit.version import __version__

__all__ = [
    "GptkitError",
    "__version__",
    "evaluate",
    "export_model",
    "finetune",
    "import_model",
    "info",
    "load",
    "prepare",
    "train",
]
