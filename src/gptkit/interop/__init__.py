"""Leaving gptkit and coming in: HuggingFace (export and import), ONNX and GGUF.

Each target lives in its own module (`hf`, `onnx`, `gguf`) and imports its optional packages
(safetensors, onnx, onnxruntime, gguf) only when used, through `require`, so that a plain install
of gptkit trains and samples without them. Every writer goes through `staged_output`: the result
appears under its name only when complete, and an existing path is replaced only with `force`,
a folder only when it holds nothing but a previous export (its manifest lists what gptkit wrote).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

from gptkit.checkpoint import save_checkpoint, save_safetensors_checkpoint
from gptkit.config import ModelConfig, RunConfig
from gptkit.console import notice
from gptkit.errors import GptkitError
from gptkit.files import give_default_modes, remove_dead_partials
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


def gpt2_misfits(config: ModelConfig) -> list[str]:
    """The switches of `config` that GPT-2's layout cannot express ("norm rmsnorm", ...); empty: a GPT-2."""
    gpt2 = ModelConfig(n_layer=1, n_head=config.n_head, n_embd=config.n_embd)
    keys = ("norm", "norm_eps", "mlp", "hidden", "position", "kv_heads", "tie_embeddings")
    return [f"{k} {getattr(config, k)}" for k in keys if getattr(config, k) != getattr(gpt2, k)]


def check_gpt2(model: GPT, target: str) -> None:
    """Refuse a model with switches GPT-2 has not, for a target that writes GPT-2 only (ONNX, GGUF)."""
    misfits = gpt2_misfits(model.config)
    if misfits:
        raise GptkitError(
            f"{target} export writes GPT-2's architecture; this model has {', '.join(misfits)} "
            "(export it with gptkit export hf, which writes Llama-style models as LlamaForCausalLM)"
        )


MANIFEST = "gptkit-export.json"  # in every exported folder: the files gptkit wrote there
MANIFEST_FORMAT = "gptkit-export"


def check_output(path: Path, force: bool, folder: bool = False) -> None:
    """Refuse an existing output path unless `force`. With `force` a file replaces a file, and a
    folder replaces only an empty folder or a previous export whose manifest lists every file in
    it: gptkit replaces only what it wrote."""
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        raise GptkitError(f"{str(path)!r} already exists; choose another output path or pass --force")
    is_dir = path.is_dir() and not path.is_symlink()
    if folder and not is_dir:
        raise GptkitError(
            f"{str(path)!r} is a file, and this export writes a folder; choose another output path "
            "(nothing was deleted)"
        )
    if not folder and is_dir:
        raise GptkitError(
            f"{str(path)!r} is a folder, and the output is a file; name a file (nothing was deleted)"
        )
    if is_dir:
        foreign = foreign_files(path)
        if foreign:
            more = " ..." if len(foreign) > 3 else ""
            raise GptkitError(
                f"{str(path)!r} holds files gptkit did not export there ({', '.join(foreign[:3])}{more}); "
                "remove them yourself or choose another output path (nothing was deleted)"
            )


def foreign_files(folder: Path) -> list[str]:
    """The files in `folder` that its export manifest does not list (all of them without one)."""
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        ours = set(manifest["files"]) if manifest.get("format") == MANIFEST_FORMAT else set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ours = set()
    if ours:
        ours.add(MANIFEST)
    return [p for p in present if p not in ours]


def check_not_input(out: str | Path, source: str | Path) -> None:
    """An output that is, or holds, the command's own input would be deleted by --force: refuse."""
    out_path, src = Path(out).resolve(), Path(source).resolve()
    if src == out_path or out_path in src.parents:
        raise GptkitError(
            f"output {str(out)!r} holds the input {str(source)!r}; replacing it would delete the input, "
            "choose another output path"
        )


@contextmanager
def staged_output(path: str | Path, force: bool, *, folder: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path` to write into; on success it replaces `path`.

    A crash or an error leaves no partial output under the real name (and removes the temporary).
    A folder gets a manifest of the files written, so that a later --force knows them for ours.
    """
    path = Path(path)
    check_output(path, force, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_dead_partials(path):
        notice(f"removed {stale}, left by an interrupted export")
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        give_default_modes(tmp)
        if folder:
            files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir())
            manifest = {"format": MANIFEST_FORMAT, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
            if path.is_dir():
                check_output(path, force, folder)  # again: something may have arrived meanwhile
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
