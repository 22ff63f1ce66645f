"""Hostile conditions (issue 14): gptkit deletes only what it wrote, keeps one writer per output,
removes what killed writers left, and turns system errors into one line, all through the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli import gptkit_cli
from conftest import TINY_RUN, wait_for_step

from gptkit.api import export_model, train
from gptkit.checkpoint import load_checkpoint, step_files
from gptkit.interop import MANIFEST
from gptkit.locks import hold

ENV = {**os.environ, "GPTKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
TEXT = "To be, or not to be, that is the question.\n" * 40


def gptkit(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return gptkit_cli(*args, env=ENV, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """The command failed with exit 2 and one `gptkit: error:` line holding `expected`, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gptkit: error: "), result.stderr
    for text in expected:
        assert text in last, last
    return last


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """`path` refuses new entries even to root (chattr +i; tests run as root, where chmod is no bar)."""
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"chattr +i is not available here, so no folder is unwritable to root: {made.stderr}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.fixture(autouse=True)
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTKIT_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def data(char_data: Path) -> Path:
    return char_data


def tiny(root: Path, data: Path, *overrides: str) -> list[str]:
    return [*TINY_RUN, f"data.path={data}", f"runs_dir={root / 'runs'}", "eval.every=0", *overrides]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """A trained run of 2 steps (one checkpoint); tests that change it take a copy."""
    root = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GPTKIT_NO_PROGRESS", "1")
        return train(None, tiny(root, data, "name=base", "train.max_steps=2")).run_dir


# -- 1. --force and --overwrite replace only what gptkit wrote --------------------------------


@pytest.mark.slow
def test_export_force_replaces_only_a_folder_gptkit_exported(tmp_path: Path, run: Path) -> None:
    project = tmp_path / "proj"  # the case: a project that happens to hold a config.json
    for name, text in {"config.json": "{}", "src/main.py": "print(1)\n", "data/thesis.txt": "years"}.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    before = tree(project)
    one_line_error(gptkit("export", "hf", run, project, "--force"), "data/thesis.txt", "nothing was deleted")
    assert tree(project) == before

    download = tmp_path / "download"  # a HuggingFace download: config.json, weights and a README
    download.mkdir()
    for name in ("config.json", "model.safetensors", "README.md"):
        (download / name).write_text("x")
    one_line_error(gptkit("export", "hf", run, download, "--force"), "README.md")
    assert (download / "README.md").read_text() == "x"

    out = tmp_path / "hf"  # gptkit's own export is replaced, and again, while it holds only its files
    assert gptkit("export", "hf", run, out).returncode == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["files"]) | {MANIFEST} == set(tree(out))
    assert gptkit("export", "hf", run, out, "--force").returncode == 0
    (out / "notes.md").write_text("mine")
    one_line_error(gptkit("export", "hf", run, out, "--force"), "notes.md")
    assert (out / "notes.md").read_text() == "mine"

    one_line_error(gptkit("export", "hf", out, out, "--force"), "would delete the input")
    assert (out / "config.json").is_file()

    a_file = tmp_path / "model.bin"  # was a NotADirectoryError traceback
    a_file.write_text("keep")
    one_line_error(gptkit("export", "hf", run, a_file, "--force"), "is a file", "writes a folder")
    assert a_file.read_text() == "keep"


@pytest.mark.slow
def test_prepare_overwrite_replaces_only_data_gptkit_prepared(tmp_path: Path) -> None:
    source = tmp_path / "source.txt"
    source.write_text(TEXT)
    project = tmp_path / "project"  # a folder that holds a meta.json of its own
    project.mkdir()
    (project / "meta.json").write_text('{"name": "my project"}')
    (project / "paper.tex").write_text("results")
    before = tree(project)
    one_line_error(
        gptkit("prepare", source, "--out", project, "--tokenizer", "char", "--overwrite"),
        "holds no prepared data",
    )
    assert tree(project) == before

    data = tmp_path / "x"  # gptkit's prepared data, with the next source saved inside it
    assert gptkit("prepare", source, "--out", data, "--tokenizer", "char").returncode == 0
    inside = data / "source.txt"
    inside.write_text(TEXT + "more\n")
    one_line_error(
        gptkit("prepare", inside, "--out", data, "--tokenizer", "char", "--overwrite"),
        "is inside --out",
        "nothing was deleted",
    )
    assert inside.read_text() == TEXT + "more\n"

    inside.rename(tmp_path / "moved.txt")  # a file of the user's among the shards is named, and kept
    (data / "notes.md").write_text("mine")
    one_line_error(
        gptkit("prepare", source, "--out", data, "--tokenizer", "char", "--overwrite"),
        "did not write there (notes.md)",
    )
    (data / "notes.md").unlink()
    assert gptkit("prepare", source, "--out", data, "--tokenizer", "char", "--overwrite").returncode == 0


# -- 3. one writer per run folder, prepared-data folder and eval.json -------------------------


@pytest.mark.slow
def test_a_second_trainer_of_a_run_is_refused_and_a_killed_ones_lock_is_not(
    tmp_path: Path, data: Path
) -> None:
    """The issue's case: a second `train` of the same name and another width while the first runs.
    It was accepted, and mixed the two runs' files; now it is refused, naming the first's PID."""
    cfg = tmp_path / "t.yaml"
    cfg.write_text("name: dup\n")
    args = tiny(tmp_path, data, "train.max_steps=100000", "checkpoint.every_steps=5")
    first = subprocess.Popen(
        [sys.executable, "-m", "gptkit", "train", cfg, *args], stderr=subprocess.PIPE, text=True, env=ENV
    )
    run = tmp_path / "runs" / "dup"
    try:
        wait_for_step(run, 2, first)
        second = gptkit("train", cfg, *tiny(tmp_path, data, "train.max_steps=3", "model.n_embd=64"))
        one_line_error(second, "runs/dup", f"PID {first.pid}")
        wait_for_step(run, 6, first)  # a checkpoint (step 5) to resume from
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert "n_embd: 32" in (run / "config.yaml").read_text(), "the second trainer wrote nothing"
    step = step_files(run)[-1][0]
    again = gptkit("train", cfg, *args, "--resume", "latest", "--stop-at", str(step + 1))
    assert again.returncode == 0, again.stderr  # the lock died with its process


def test_prepare_and_eval_refuse_a_folder_another_process_writes(tmp_path: Path, run: Path) -> None:
    source = tmp_path / "source.txt"
    source.write_text(TEXT)
    with hold(tmp_path / "data", "prepared data"):
        busy = gptkit("prepare", source, "--out", tmp_path / "data", "--tokenizer", "char")
    one_line_error(busy, f"PID {os.getpid()}")
    assert not (tmp_path / "data").exists()

    with hold(run / "eval.json", "eval results"):
        busy = gptkit("eval", run, "--text", source, "--no-progress")
    one_line_error(busy, "eval.json", f"PID {os.getpid()}")
    assert busy.stdout == "", "refused before evaluating"


# -- 7. temporaries of killed writers ---------------------------------------------------------


def test_temporaries_of_dead_processes_are_removed_when_the_run_is_opened(tmp_path: Path, data: Path) -> None:
    overrides = tiny(tmp_path, data, "name=t", "train.max_steps=6")
    train(None, overrides, stop_at=2)
    run = tmp_path / "runs" / "t"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        orphans = [
            run / "checkpoints" / f".step_00000004.pt.tmp-{dead_pid}",
            run / f".metrics.jsonl.tmp-{dead_pid}",
        ]
        writing = run / "checkpoints" / f".step_00000004.pt.tmp-{live.pid}"
        for path in [*orphans, writing]:
            path.write_bytes(b"\0" * 1000)
        train(None, overrides, resume="latest", stop_at=4)
        assert not [p for p in orphans if p.exists()]
        assert writing.exists(), "a live process's temporary is not ours to remove"

        partial = tmp_path / f".hf.partial-{dead_pid}"  # an export killed while writing its folder
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(b"\0" * 1000)
        export_model(run, "safetensors", tmp_path / "w.safetensors")
        assert partial.exists(), "only the partial output of the same path is removed"
        export_model(run, "hf", tmp_path / "hf")
        assert not partial.exists()
    finally:
        live.kill()
        live.wait()


# -- 8. system errors: one line naming the path and the cause ---------------------------------


@pytest.mark.slow
def test_unwritable_folders_give_one_line_errors(tmp_path: Path, data: Path, run: Path) -> None:
    """Folders that refuse writes even to root (chattr +i): prepare, export, train --resume and
    eval end in one line naming the path and the cause; eval prints its results first."""
    source = tmp_path / "source.txt"
    source.write_text(TEXT)
    locked = tmp_path / "locked"
    locked.mkdir()
    subprocess.run(["cp", "-r", str(run.parent), str(tmp_path / "runs")], check=True)
    own = tmp_path / "runs" / run.name
    checkpoints = tree(own / "checkpoints")
    cfg = tmp_path / "base.yaml"
    cfg.write_text("")
    with immutable(locked), immutable(own):
        one_line_error(gptkit("prepare", source, "--out", locked / "d", "--tokenizer", "char"), "locked/")
        one_line_error(gptkit("export", "hf", run, locked / "hf"), "locked/", "Operation not permitted")
        resumed = gptkit("train", cfg, *tiny(tmp_path, data, "train.max_steps=4"), "--resume", "latest")
        one_line_error(resumed, f"{run.name}/", "Operation not permitted")
        evaluated = gptkit("eval", own, "--text", source, "--no-progress")
        one_line_error(evaluated, "eval.json", "were not saved")
        assert "perplexity" in evaluated.stdout, "the results are printed before the save fails"
    assert tree(own / "checkpoints") == checkpoints, "the checkpoints are kept"
    assert not [p for p in own.rglob("*") if ".tmp-" in p.name]


def _small_file_limit(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit is then EFBIG, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_a_file_size_limit_while_saving_keeps_the_previous_checkpoint(tmp_path: Path, data: Path) -> None:
    """`ulimit -f` below a checkpoint's size: saves fail with EFBIG, which is reported like a full
    disk, and the checkpoint written before the limit stays the one to resume."""
    cfg = tmp_path / "lim.yaml"
    cfg.write_text("")
    args = tiny(tmp_path, data, "train.max_steps=6", "checkpoint.every_steps=1")
    assert gptkit("train", cfg, *args, "--stop-at", "2").returncode == 0
    run = tmp_path / "runs" / "lim"
    size = step_files(run)[-1][1].stat().st_size
    limited = subprocess.run(
        [sys.executable, "-m", "gptkit", "train", cfg, *args, "--resume", "latest"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        preexec_fn=lambda: _small_file_limit(size // 2),
    )
    assert limited.returncode == 0, limited.stderr
    assert "Traceback" not in limited.stderr
    assert "file too large" in limited.stderr and "ulimit -f" in limited.stderr
    assert [s for s, _ in step_files(run)][-1] == 2
    assert load_checkpoint(step_files(run)[-1][1])["progress"]["step"] == 2
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]


# -- 9. inputs that were tracebacks -----------------------------------------------------------


def test_a_huge_seed_and_a_run_name_that_is_a_file_are_one_line_errors(
    tmp_path: Path, data: Path, run: Path
) -> None:
    huge = gptkit(
        "sample", run, "--prompt", "a", "--max-new-tokens", "2", "--seed", "99999999999999999999999"
    )
    one_line_error(huge, "seed")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "clash").write_text("a file")
    cfg = tmp_path / "clash.yaml"
    cfg.write_text("")
    one_line_error(gptkit("train", cfg, *tiny(tmp_path, data, "train.max_steps=2")), "is a file", "name=")
    assert (tmp_path / "runs" / "clash").read_text() == "a file"


# -- 11b. sources that can be read only once --------------------------------------------------


def test_a_pipe_source_is_read_once_or_refused(tmp_path: Path) -> None:
    """The char tokenizer reads its sources twice: a pipe is refused (it hung, or gave "no text
    found"); the gpt2 tokenizer reads once, and gets every byte (nothing is opened just to look)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused = gptkit("prepare", fifo, "--out", tmp_path / "char", "--tokenizer", "char", timeout=30)
    one_line_error(refused, "pipe", "reads its sources twice", "--tokenizer gpt2")
    source = tmp_path / "source.txt"
    source.write_text(TEXT)
    substituted = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -m gptkit prepare <(cat "$1") --out "$2" --tokenizer char', "-"]
        + [str(source), str(tmp_path / "sub")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    one_line_error(substituted, "/dev/fd/", "pipe")

    def feed() -> None:
        with fifo.open("w") as f:
            f.write(TEXT)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    read = gptkit("prepare", fifo, "--out", tmp_path / "gpt2", "--val-fraction", "0", timeout=60)
    writer.join(timeout=10)
    assert read.returncode == 0, read.stderr
    meta = json.loads((tmp_path / "gpt2" / "meta.json").read_text())
    assert meta["sources"][0]["bytes"] == len(TEXT.encode())
