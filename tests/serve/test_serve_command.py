"""`gptkit serve` on the command line: its options, and bad input as one-line errors before serving."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def gptkit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gptkit", *args], capture_output=True, text=True, timeout=120
    )


def test_serve_help_lists_the_options() -> None:
    out = gptkit_cli("serve", "--help")
    assert out.returncode == 0
    for option in ("--host", "--port", "--api-key", "--quantize", "--adapter", "--max-batch", "--max-queue",
                   "--cors-origin"):  # fmt: skip
        assert option in out.stdout
    assert "127.0.0.1" in out.stdout


def test_bad_input_is_one_line_before_anything_is_served(tmp_path: Path) -> None:
    out = gptkit_cli("serve", str(tmp_path / "missing.pt"))
    assert out.returncode == 2 and "not found" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    out = gptkit_cli("serve", str(tmp_path / "missing.pt"), "--max-batch", "0")
    assert out.returncode == 2 and "--max-batch" in out.stderr and out.stderr.count("\n") == 1, out.stderr
