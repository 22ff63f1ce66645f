"""Every `gptkit` command line of the README's bash blocks runs, as written, against the models the
README says to train (with fewer steps), or is listed in NOT_RUN with the reason.

The commands run in a temporary folder laid out like a clone after the quick start: configs/,
data/default and runs/tiny, and ../shared/data beside it. Commands that make things (prepare, train,
finetune, export, import) run first, in README order, then the others in README order. A new command
in the README is run by this test; one that cannot run here must be added to NOT_RUN. Each `gptkit` is
a process of its own, forked from a zygote that imported torch and gptkit once (zygote.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SHARED_DATA, shared_file
from surface.zygote import serving

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")

MULTI = "several processes (tests/training/test_distributed.py runs torchrun with 2, DDP and FSDP)"
SERVER = "a server that runs until stopped (tests/serve/ run servers and this section's examples)"
NOT_RUN = {
    "gptkit serve runs/tiny": SERVER,
    "gptkit import hf HuggingFaceTB/SmolLM-135M checkpoints/smollm.pt": (
        "downloads from the hub (tests/interop/test_llama.py reads a hub name from a local cache offline)"
    ),
    'gptkit serve runs/sft --quantize int8 --max-batch 8 --api-key "$(cat key.txt)"': SERVER,
    "gptkit serve runs/sft-docs --rag index/docs": SERVER,
    "torchrun --nproc_per_node=4 -m gptkit train configs/small.yaml": MULTI,
    "torchrun --nproc_per_node=4 -m gptkit train configs/small.yaml train.distributed=fsdp": MULTI,
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=node0:29500 "
    "-m gptkit train configs/small.yaml": "2 machines",
    'srun torchrun --nnodes="$SLURM_NNODES" --nproc_per_node=8 --rdzv_id="$SLURM_JOB_ID" '
    '--rdzv_backend=c10d --rdzv_endpoint="$head:29500" -m gptkit train configs/small.yaml --resume auto': (
        "a SLURM cluster"
    ),
}

# Fewer steps and tokens: appended, so they win over the README's values; shapes are never changed.
FAST_TRAIN = [
    "train.max_steps=2",
    "train.micro_batch_size=2",
    "eval.every=0",
    "eval.batches=1",
    "eval.sample_tokens=8",
    "checkpoint.every_steps=0",
]
FAST = {"train": FAST_TRAIN, "finetune": FAST_TRAIN, "sample": ["--max-new-tokens", "12"]}
FAST["chat"] = FAST["sample"]
MAKERS = ("prepare", "train", "finetune", "export", "import")


def readme_commands() -> list[str]:
    """The command lines of the bash blocks that run gptkit: continuations joined, comments cut."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            line = re.sub(r"\s+", " ", line)
            if line and not line.startswith("#") and re.search(r"(^|\s)(-m )?gptkit\s", line):
                out.append(line)
    return out


def subcommand(line: str) -> str:
    return re.search(r"gptkit (\w+)", line).group(1)  # type: ignore[union-attr]


def shortened(line: str) -> str:
    """The command with FAST's arguments, and eval limited to a few examples."""
    sub = subcommand(line)
    if sub == "eval":
        line = re.sub(r" --limit \d+", "", line) + " --limit 4"
    return " ".join([line, *FAST.get(sub, [])])


def test_every_command_is_run_or_listed_with_a_reason() -> None:
    commands = readme_commands()
    assert len(commands) > 25
    assert not set(NOT_RUN) - set(commands), "NOT_RUN lists commands the README no longer has"


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A folder like a clone after the quick start (runs/tiny trained for 2 steps), with `gptkit` on PATH.

    `gptkit` there is zygote_client.py: each command line still runs under `bash -c` as written, and
    each `gptkit` in it is a process of its own, forked from a zygote (zygote.py) that imported torch
    and gptkit once (about 60 fresh interpreters and their imports were most of this test's time)."""
    shared_file("tinyshakespeare/input.txt")
    alpaca = shared_file("instruct/alpaca_5000.json")
    root = tmp_path_factory.mktemp("readme")
    (root / "shared").mkdir()
    (root / "shared" / "data").symlink_to(SHARED_DATA.resolve(), target_is_directory=True)
    work = root / "clone"
    shutil.copytree(ROOT / "configs", work / "configs")
    (work / "data").mkdir()
    records = json.loads(alpaca.read_text(encoding="utf-8"))[
        :300
    ]  # configs/sft.yaml's data: Alpaca's records
    (work / "data" / "alpaca_data.json").write_text(json.dumps(records), encoding="utf-8")
    (work / "prompts.txt").write_text("The list\nA function\n")  # for --prompt-file
    (work / "questions.txt").write_text("Name three colours.\nWhat is a list?\n")  # for eval --prompts
    (work / "docs").mkdir()  # the documents of the retrieval guide
    (work / "docs" / "tea.md").write_text("# Tea\n\nGreen tea is steeped at 80 degrees for two minutes.\n")
    (work / "docs" / "bread.txt").write_text("Bread rises because yeast turns sugar into gas. Bake it hot.\n")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GPTKIT_NO_PROGRESS": "1"}
    with serving(bin_dir, work, env):
        quick_start = [  # what scripts/quickstart.sh runs after setting up .venv
            "gptkit prepare --out data/default --tokenizer char --overwrite --no-progress",
            "gptkit train configs/tiny.yaml " + " ".join(FAST_TRAIN),
        ]
        for command in quick_start:
            out = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True)
            assert out.returncode == 0, f"{command}\n{out.stderr[-2000:]}"
        yield work, env


@pytest.mark.slow
def test_every_readme_command_runs(clone: tuple[Path, dict[str, str]]) -> None:
    work, env = clone
    commands = [c for c in readme_commands() if c not in NOT_RUN]
    ordered = sorted(commands, key=lambda c: subcommand(c) not in MAKERS)  # stable: README order within
    seconds = []
    for command in ordered:
        start = time.monotonic()
        out = subprocess.run(
            ["bash", "-c", shortened(command)],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,  # interactive chat ends at once: it loads the model and exits
            capture_output=True,
            text=True,
            timeout=900,
        )
        seconds.append((time.monotonic() - start, command))
        assert out.returncode == 0, f"{shortened(command)}\n{out.stderr[-3000:]}"
        for line in README.splitlines():  # "gptkit info gpt2   # 124,439,808 parameters": the number shows
            if line.startswith(command) and (number := re.search(r"#\s.*?(\d{1,3}(?:,\d{3})+)", line)):
                assert number.group(1) in out.stdout, f"{command}: {number.group(1)} not in\n{out.stdout}"
    print("\n".join(f"{t:6.1f} s  {c}" for t, c in sorted(seconds, reverse=True)))
