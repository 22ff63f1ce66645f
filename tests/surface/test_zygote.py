"""The zygote the README test runs its commands through (zygote.py) behaves as a fresh `python -m
gptkit` does: the same exit code, standard output and error, for lines that use the arguments, the
working folder, the environment, standard input and a failing exit."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from surface.zygote import serving

LINES = [
    "gptkit --version",
    "gptkit frobnicate",  # argparse's error: usage on stderr, exit 2
    "COLUMNS=50 gptkit info --help",  # the command's environment, not the zygote's
    "cd sub && gptkit info configs/bad.yaml",  # its working folder: the config's error names the file
    "echo 'a prompt' | gptkit sample no/such/run --max-new-tokens 1",  # stdin read, then exit 2
    'gptkit info tiny; echo "exit $?"',
]


def folder_with_a_bad_config(root: Path) -> Path:
    (root / "sub" / "configs").mkdir(parents=True)
    (root / "sub" / "configs" / "bad.yaml").write_text("model:\n  n_layr: 4\n")
    return root


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str], dict[str, str]]]:
    """The folder, and the environments of a fresh `gptkit` and of the zygote's (a light one)."""
    root = folder_with_a_bad_config(tmp_path_factory.mktemp("zygote"))
    fresh_bin, zygote_bin = root / "fresh", root / "zygote"
    fresh_bin.mkdir()
    zygote_bin.mkdir()
    (fresh_bin / "gptkit").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m gptkit "$@"\n')
    (fresh_bin / "gptkit").chmod(0o755)
    fresh = {**os.environ, "PATH": f"{fresh_bin}:{os.environ['PATH']}"}
    forked = {**os.environ, "PATH": f"{zygote_bin}:{os.environ['PATH']}"}
    with serving(zygote_bin, root, forked, ["gptkit.cli"]):
        yield root, fresh, forked


@pytest.mark.parametrize("line", LINES)
def test_a_forked_command_is_a_fresh_one(both, line: str) -> None:
    root, fresh, forked = both
    said = []
    for env in (fresh, forked):
        out = subprocess.run(
            ["bash", "-c", line], cwd=root, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
        said.append((out.returncode, out.stdout, out.stderr))
    assert said[0][1] or said[0][2], "the line says something"
    assert said[1] == said[0]
