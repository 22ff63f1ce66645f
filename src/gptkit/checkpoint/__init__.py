"""Checkpoints: the one file format (format.py) and the one place that knows a run folder (run.py)."""

from gptkit.checkpoint.format import (
    SAFETENSORS_SUFFIX,
    SUFFIX,
    clean_state_dict,
    content_digest,
    load_checkpoint,
    save_checkpoint,
    save_safetensors_checkpoint,
)
from gptkit.checkpoint.run import (
    CHECKPOINT_FOLDER,
    RunCheckpoints,
    checkpoint_folder,
    earlier_run_files,
    is_run,
    newest_intact,
    remove_orphan_temporaries,
    run_of,
    step_file,
    step_files,
)

__all__ = [
    "CHECKPOINT_FOLDER",
    "SAFETENSORS_SUFFIX",
    "SUFFIX",
    "RunCheckpoints",
    "checkpoint_folder",
    "clean_state_dict",
    "content_digest",
    "earlier_run_files",
    "is_run",
    "load_checkpoint",
    "newest_intact",
    "remove_orphan_temporaries",
    "run_of",
    "save_checkpoint",
    "save_safetensors_checkpoint",
    "step_file",
    "step_files",
]
