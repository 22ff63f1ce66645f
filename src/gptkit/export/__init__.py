"""Leaving gptkit and coming in: HuggingFace (export and import), ONNX and GGUF.

Each target lives in its own module (`hf`, `onnx`, `gguf`) and imports its optional packages
(safetensors, onnx, onnxruntime, gguf) only when used, through `require`, so that a plain install
of gptkit trains and samples without them. Every writer goes through `staged_output`: the result
appears under its name only when complete, and an existing path is replaced only with `force`.
"""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

from gptkit.config import RunConfig
from gptkit.errors import GptkitError
from gptkit.files import give_default_modes
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer

EXTRA = "gptkit[export]"


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional package, or a one-line error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise GptkitError(
            f"{purpose} needs the {module.split('.')[0]!r} package; install it with pip install '{EXTRA}'"
        ) from None


def check_plain(model: GPT, target: str) -> None:
    """Refuse a model with tensors GPT-2 has no place for (prompt tuning's soft prompt, unmerged
    adapters): the export would silently drop them and its logits would differ from ours."""
    with torch.device("meta"):
        plain = set(GPT(model.config).state_dict())
    extra = sorted(set(model.state_dict()) - plain)
    if extra:
        more = " ..." if len(extra) > 3 else ""
        raise GptkitError(
            f"{target} export cannot express {', '.join(extra[:3])}{more}: GPT-2's layout has no place "
            "for them (a prompt-tuned model's soft prompt); export a full or LoRA fine-tune instead"
        )


def check_output(path: Path, force: bool, folder_marker: str | None = None) -> None:
    """Refuse an existing output path unless `force`. A folder is replaced only when it holds a
    previous result (`folder_marker` inside) or nothing, so a slip of the path cannot wipe a home."""
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        raise GptkitError(f"{str(path)!r} already exists; choose another output path or pass --force")
    if path.is_dir() and not path.is_symlink() and not _previous_result(path, folder_marker):
        raise GptkitError(
            f"{str(path)!r} is a folder that does not hold a previous export; remove it yourself or "
            "choose another output path"
        )


def _previous_result(folder: Path, marker: str | None) -> bool:
    return marker is not None and ((folder / marker).is_file() or not any(folder.iterdir()))


@contextmanager
def staged_output(path: str | Path, force: bool, *, folder: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path` to write into; on success it replaces `path`.

    A crash or an error leaves no partial output under the real name (and removes the temporary).
    """
    path = Path(path)
    check_output(path, force, "config.json" if folder else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        give_default_modes(tmp)
        if folder and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def save_weights(
    model: GPT,
    tokenizer: Tokenizer,
    config: RunConfig,
    out: str | Path,
    *,
    force: bool = False,
    progress: dict | None = None,
    chat_template: dict | None = None,
) -> Path:
    """A weights-only gptkit checkpoint: `.safetensors` (no pickle) or `.pt`; starts runs at step 0."""
    from gptkit.checkpoint import save_checkpoint, save_safetensors_checkpoint

    save = save_safetensors_checkpoint if str(out).endswith(".safetensors") else save_checkpoint
    with staged_output(out, force) as tmp:
        save(
            tmp,
            model_state=model.state_dict(),
            config=config.model_dump(mode="json"),
            tokenizer=tokenizer.describe(),
            progress=progress,
            chat_template=chat_template,
        )
    return Path(out)
