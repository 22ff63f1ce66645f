"""The README's commands run, so the docs cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the quick start has a bash block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_is_exactly_two_commands_and_ci_runs_the_second() -> None:
    commands = quick_start_commands()
    assert commands == ["bash scripts/quickstart.sh", "bash scripts/test.sh"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci


@pytest.mark.slow
def test_quick_start_main_job_runs(tmp_path: Path) -> None:
    """The first command, with its data written to a temporary folder."""
    env = {**os.environ, "GPTKIT_WORKDIR": str(tmp_path)}
    short = ["train.max_steps=30", "eval.every=15", "eval.sample_tokens=30", "checkpoint.every_steps=0"]
    out = subprocess.run(
        quick_start_commands()[0].split() + short,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "data" / "default" / "meta.json").is_file()
    run = tmp_path / "runs" / "tiny"
    assert out.stdout.count("--- sample at step 30 ---") == 2
    assert "best val loss" in out.stdout
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "report.md", "samples.md"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "step_00000030.pt").is_file()


def test_quick_start_again_keeps_the_earlier_run(tmp_path: Path) -> None:
    """A second quick start trains runs/tiny-2 and leaves runs/tiny as it was."""
    env = {**os.environ, "GPTKIT_WORKDIR": str(tmp_path), "GPTKIT_SETUP": "0", "GPTKIT_NO_PROGRESS": "1"}
    short = ["train.max_steps=2", "eval.batches=1", "eval.sample_tokens=0", "checkpoint.every_steps=0"]
    outputs = []
    for _ in range(2):
        out = subprocess.run(
            ["bash", "scripts/quickstart.sh", *short],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        outputs.append(out.stdout)
    assert f"run: {tmp_path}/runs/tiny\n" in outputs[0] and f"run: {tmp_path}/runs/tiny-2\n" in outputs[1]
    for name in ("tiny", "tiny-2"):
        assert (tmp_path / "runs" / name / "checkpoints" / "step_00000002.pt").is_file()


def test_readme_error_example_is_what_gptkit_prints(tmp_path: Path) -> None:
    example = next(line for line in README.splitlines() if line.startswith("gptkit: error: invalid config"))
    config = tmp_path / "configs" / "tiny.yaml"
    config.parent.mkdir()
    config.write_text("model:\n  n_layr: 4\n")
    out = subprocess.run(
        [sys.executable, "-m", "gptkit", "info", "configs/tiny.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == example


def test_readme_python_api_example_runs(tmp_path: Path) -> None:
    """Every python block of the README runs as written, in a folder holding `notes/`."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) == README.count("```python"), "every python block is found, not only the first"
    assert any("gptkit.generate.Chat(" in code for code in blocks), "the Chat example is a block that runs"
    blocks = [code for code in blocks if "from openai import" not in code]  # tests/serve run it on a server
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("Some notes about tokenizers and models.\n" * 2000)
    for code in blocks:
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-2000:]
        for expected in re.findall(r"# (\d+)$", code, re.M):  # "print(x)  # 123" comments are checked
            assert expected in out.stdout


def test_export_section_and_the_missing_package_error_name_the_extra() -> None:
    from gptkit.errors import GptkitError
    from gptkit.interop import require

    section = README.split("## Export and import", 1)[1].split("```bash", 1)[0]
    assert "pip install 'gptkit[export]'" in section, "said before the export commands"
    try:
        require("gptkit_no_such_package", "ONNX export")
    except GptkitError as e:
        assert "pip install 'gptkit[export]'" in str(e)
    else:
        raise AssertionError("a missing package is an error")


def test_reliability_table_names_tests_that_exist() -> None:
    """Every `file::test` of the README's reliability table is a test function in tests/."""
    section = README.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", section)
    assert len(named) >= 20
    for file, test in named:
        assert re.search(rf"^def {test}\(", (ROOT / "tests" / file).read_text(), re.M), f"{file}::{test}"
