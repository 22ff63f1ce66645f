"""gptkit: train GPT-2-style language models from scratch and put them to use."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gptkit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

from gptkit.api import (  # noqa: E402
    evaluate,
    export_model,
    finetune,
    import_model,
    info,
    load,
    prepare,
    train,
)
from gptkit.errors import GptkitError  # noqa: E402

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
