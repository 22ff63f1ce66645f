"""gptkit: train GPT-2-style language models from scratch and put them to use."""

from gptkit.api import (
    evaluate,
    export_model,
    finetune,
    import_model,
    info,
    load,
    prepare,
    serve,
    train,
)
from gptkit.errors import GptkitError
from gptkit.version import __version__

# Subpackages load on first attribute access (`gptkit.generate.Chat` after `import gptkit`), so that
# `import gptkit` and `gptkit --help` stay free of torch.
SUBPACKAGES = ("data", "eval", "export", "finetuning", "generate", "serve", "training")


def __getattr__(name: str) -> object:
    if name in SUBPACKAGES:
        import importlib

        return importlib.import_module(f"gptkit.{name}")
    raise AttributeError(f"module 'gptkit' has no attribute {name!r}")


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
    "serve",
    "train",
]
