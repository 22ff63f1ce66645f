"""The one checkpoint format: atomic save, verified load, discovery of a run's checkpoints.

A checkpoint is a single `torch.save` file holding plain data only (tensors, dicts, numbers,
strings), so it loads with `weights_only=True`:
  format, format_version, gptkit_version
  config      the fully resolved RunConfig, as a dict
  tokenizer   the tokenizer description (rebuilt with gptkit.tokenizer.from_description)
  model       the model's state_dict, without wrapper prefixes (_orig_mod., module.)
  progress    counters such as step and tokens seen
  state       everything else a resume needs (optimiser, schedule, loader, RNG, ...)
  chat_template  (only in instruction-tuned checkpoints) the ChatTemplate as a dict, see generate/chat.py
  sha256      the digest of everything above (`content_digest`), checked on load: a flipped byte in
              a tensor record loads without error in torch, so only this finds it. Checkpoints
              written before gptkit stored it load unchecked.

The weights alone can also be saved as `.safetensors` (`save_safetensors_checkpoint`): no pickle, so
safe to load from anyone; config, tokenizer, progress and chat template ride along as JSON metadata,
and `load_checkpoint` reads it like a `.pt` with an empty `state` (sampling, evaluation, fine-tuning).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

import torch

import gptkit
from gptkit.config import RunConfig, validate
from gptkit.console import notice
from gptkit.errors import GptkitError
from gptkit.files import fsync_dir, write_atomic
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer, from_description

FORMAT = "gptkit-checkpoint"
FORMAT_VERSION = 1
SUFFIX = ".pt"
SAFETENSORS_SUFFIX = ".safetensors"
_JSON_FIELDS = ("config", "tokenizer", "progress", "chat_template")  # safetensors metadata holds strings
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
DIGEST_KEY = "sha256"


def content_digest(payload: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's content as loaded: tensors by dtype, shape and bytes, everything else
    by its repr, in order. Computed from memory on both sides, so checking costs one pass over the
    weights (~1.7 GB/s) and no second read of the file."""
    digest = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"T{t.dtype}{tuple(value.shape)}".encode())
            digest.update(memoryview(t.view(torch.uint8).numpy()))
        elif isinstance(value, dict):
            digest.update(b"{")
            for key, item in value.items():
                digest.update(repr(key).encode())
                walk(item)
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[" if isinstance(value, list) else b"(")
            for item in value:
                walk(item)
            digest.update(b"]")
        else:
            digest.update(repr(value).encode())

    walk({k: v for k, v in payload.items() if k != DIGEST_KEY})
    return digest.hexdigest()


def clean_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Strip the prefixes torch.compile and DDP add, so any checkpoint loads into a plain model."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


class _Writer:
    """A file wrapper that remembers the OSError of a failed write (torch.save replaces it)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def save_checkpoint(
    path: str | Path,
    *,
    model_state: dict[str, Any],
    config: dict[str, Any],
    tokenizer: dict[str, Any],
    progress: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
    chat_template: dict[str, Any] | None = None,
) -> Path:
    """Write atomically: temporary file, fsync, rename. A crash at any moment leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gptkit_version": gptkit.__version__,
        "config": config,
        "tokenizer": tokenizer,
        "model": clean_state_dict(model_state),
        "progress": progress or {},
        "state": state or {},
    }
    if chat_template is not None:
        payload["chat_template"] = chat_template
    payload[DIGEST_KEY] = content_digest(payload)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            writer = _Writer(f)
            try:
                torch.save(payload, writer)
            except RuntimeError:
                if writer.error is not None:  # torch hides e.g. ENOSPC behind a RuntimeError: show it
                    raise writer.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def save_safetensors_checkpoint(
    path: str | Path,
    *,
    model_state: dict[str, Any],
    config: dict[str, Any],
    tokenizer: dict[str, Any],
    progress: dict[str, Any] | None = None,
    chat_template: dict[str, Any] | None = None,
) -> Path:
    """The weights as safetensors, the rest as JSON metadata; no optimiser state (not resumable)."""
    try:
        from safetensors.torch import save as safetensors_bytes
    except ImportError:
        raise GptkitError(
            "safetensors checkpoints need the 'safetensors' package: pip install 'gptkit[export]'"
        ) from None
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}  # safetensors refuses shared storage: store once, name the aliases
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for key, t in clean_state_dict(model_state).items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            tied[key] = seen[ident]
        else:
            seen[ident] = key
            tensors[key] = t.detach().to("cpu").contiguous()
    fields = {
        "config": config,
        "tokenizer": tokenizer,
        "progress": progress or {},
        "chat_template": chat_template,
    }
    metadata = {
        "format": "pt",
        "gptkit_format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "gptkit_version": gptkit.__version__,
        "tied": json.dumps(tied),
        **{k: json.dumps(v) for k, v in fields.items() if v is not None},
    }
    metadata[DIGEST_KEY] = _safetensors_digest(tensors, metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, safetensors_bytes(tensors, metadata=metadata), durable=True)
    return path


def _fails_check(path: Path) -> GptkitError:
    return GptkitError(
        f"checkpoint {str(path)!r} fails its content check (its sha256 differs from the one saved "
        "with it: the file was damaged after it was written); use another one"
    )


def _safetensors_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """The content digest of a safetensors checkpoint: its tensors and metadata, by name (the file
    orders tensors its own way)."""
    return content_digest(
        {"model": dict(sorted(tensors.items())), "metadata": dict(sorted(metadata.items()))}
    )


def _load_safetensors(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise GptkitError(
            "safetensors checkpoints need the 'safetensors' package: pip install 'gptkit[export]'"
        ) from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            model = {key: f.get_tensor(key).to(map_location) for key in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for damaged files
        first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise GptkitError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({first}); use another one"
        ) from None
    if metadata.get("gptkit_format") != FORMAT:
        raise GptkitError(
            f"{str(path)!r} is a safetensors file without gptkit's metadata; import HuggingFace folders "
            "with gptkit import hf"
        )
    stored = metadata.pop(DIGEST_KEY, None)
    if stored is not None and stored != _safetensors_digest(model, metadata):
        raise _fails_check(path)
    for alias, key in json.loads(metadata.get("tied", "{}")).items():
        model[alias] = model[key]
    payload = {k: json.loads(metadata[k]) for k in _JSON_FIELDS if k in metadata}
    return {
        "format": FORMAT,
        "format_version": int(metadata.get("format_version", 0)),
        "gptkit_version": metadata.get("gptkit_version"),
        "model": model,
        "state": {},
        **payload,
    }


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and verify; a missing, truncated or foreign file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise GptkitError(f"checkpoint {str(path)!r} not found; pass a checkpoint file or a run folder")
    if path.suffix == SAFETENSORS_SUFFIX:
        payload = _load_safetensors(path, map_location)
        if payload["format_version"] != FORMAT_VERSION:
            raise GptkitError(
                f"checkpoint {str(path)!r} has format version {payload['format_version']}, "
                f"this gptkit reads version {FORMAT_VERSION}; use a matching gptkit version"
            )
        return payload
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for damaged files
        first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise GptkitError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({first}); use another one"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise GptkitError(
            f"{str(path)!r} is not a gptkit checkpoint; import foreign weights with gptkit import"
        )
    if payload.get("format_version") != FORMAT_VERSION:
        raise GptkitError(
            f"checkpoint {str(path)!r} has format version {payload.get('format_version')}, "
            f"this gptkit reads version {FORMAT_VERSION}; use a matching gptkit version"
        )
    stored = payload.get(DIGEST_KEY)
    if stored is not None and stored != content_digest(payload):
        raise _fails_check(path)
    return payload


def run_checkpoints(run: str | Path) -> list[Path]:
    """A run folder's checkpoint files, oldest first (by time written, then name)."""
    folder = Path(run) / "checkpoints"
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.suffix == SUFFIX and not p.name.startswith(".")]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))


def is_run(path: str | Path) -> bool:
    return (Path(path) / "checkpoints").is_dir()


def load_newest(
    files: list[Path], map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """The newest of `files` (oldest first) that loads; damaged newer ones are named and skipped."""
    for path in reversed(files):
        try:
            return path, load_checkpoint(path, map_location)
        except GptkitError as e:  # the damaged file stays for inspection
            notice(f"{e}; falling back to an earlier checkpoint")
    return None


def find_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]]:
    """A checkpoint file, or a run folder's newest intact checkpoint: (its path, its payload)."""
    path = Path(path)
    if path.is_dir():
        if not is_run(path):
            raise GptkitError(
                f"{str(path)!r} is not a run folder (no checkpoints/ inside); pass a run folder such as "
                "runs/tiny or a checkpoint file"
            )
        files = run_checkpoints(path)
        found = load_newest(files, map_location)
        if found is None and files:
            raise GptkitError(
                f"no checkpoint of run {str(path)!r} is intact ({', '.join(p.name for p in files)}: "
                "damaged, see above); pass a checkpoint file from elsewhere, or train the run again"
            )
        if found is None:
            raise GptkitError(f"run {str(path)!r} has no intact checkpoint yet; train it first")
        return found
    return path, load_checkpoint(path, map_location)


def load_model(payload: dict[str, Any]) -> tuple[GPT, Tokenizer, RunConfig]:
    """The model (on CPU, eval mode), tokenizer and config a checkpoint's payload holds."""
    config = validate(RunConfig, payload["config"], "checkpoint config")
    tokenizer = from_description(payload["tokenizer"])
    if config.model.vocab_size != tokenizer.vocab_size:
        raise GptkitError(
            f"checkpoint's model has {config.model.vocab_size} token ids but its tokenizer has "
            f"{tokenizer.vocab_size}; the checkpoint is inconsistent, use another one"
        )
    model = GPT(config.model)
    if config.finetune.base is not None:  # a fine-tune's checkpoint: its modules (LoRA, soft prompt)
        from gptkit.finetuning.lora import merge
        from gptkit.finetuning.methods import apply_method

        model = apply_method(model, config.finetune, tokenizer)
        model.load_state_dict(clean_state_dict(payload["model"]))
        merge(model)  # LoRA folded into the weights: a plain model, as fast as the base
    else:
        model.load_state_dict(clean_state_dict(payload["model"]))
    return model.eval(), tokenizer, config


def is_hf_folder(path: str | Path) -> bool:
    """A HuggingFace model folder (config.json inside) rather than a gptkit run."""
    return (Path(path) / "config.json").is_file() and not is_run(path)


def load_any(path: str | Path) -> tuple[GPT, Tokenizer, RunConfig, Path, dict[str, Any]]:
    """(model, tokenizer, run config, source, checkpoint payload) of a run folder (its newest intact
    checkpoint), a checkpoint file, or a HuggingFace GPT-2 folder (payload {}): what every command
    that starts from a trained model accepts."""
    if is_hf_folder(path):
        from gptkit.export.hf import load_hf

        model, tokenizer, config = load_hf(path)
        return model, tokenizer, config, Path(path), {}
    ckpt, payload = find_checkpoint(path)
    model, tokenizer, config = load_model(payload)
    return model, tokenizer, config, ckpt, payload
