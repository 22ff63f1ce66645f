"""The floor plan: imports flow down (DESIGN.md), checked on the source and on what importing loads."""

from __future__ import annotations

import json
import subprocess
import sys


def loaded_after_import(module: str) -> list[str]:
    """The gptkit modules a fresh interpreter holds after importing `module`."""
    code = f"import sys, {module}; print(__import__('json').dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return [m for m in json.loads(out) if m.startswith("gptkit")]


def test_instruction_data_does_not_load_the_sampler() -> None:
    loaded = loaded_after_import("gptkit.finetuning.instructions")
    assert "gptkit.templates" in loaded
    assert not [m for m in loaded if m.startswith("gptkit.generate")], loaded
