"""Every parameter count the README and the configs state is what `gptkit info` reports.

A new statement of a count ("N parameters", "GPT-2 124M", "(355M)") must be added to CLAIMS with
the model it describes, so that no number in the docs goes unchecked."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from gptkit.api import info, prepare

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "configs").glob("*.yaml"))]
STATED = re.compile(r"(\d[\d,]*(?:\.\d+)?[MB]?)[- ](?:parameters?|params)\b|(?:GPT-2 |\()(\d[\d.]*[MB])\b")

# The fine-tuning benchmark's base (README): 6 layers, 8 heads, width 256, context 256, GPT-2 vocabulary.
BENCH_BASE = "model:\n  n_layer: 6\n  n_head: 8\n  n_embd: 256\n  block_size: 256\n  vocab_size: 50257\n"

# (file, number as written) -> what it describes (a preset, a config of the repository, or
# "bench-base"), and where info runs: "quickstart" (the quick start's character data is prepared) or
# "clone" (no data yet: a config's vocabulary is GPT-2's).
CLAIMS: dict[tuple[str, str], tuple[str, str]] = {
    ("README.md", "0.8M"): ("configs/tiny.yaml", "quickstart"),
    ("README.md", "124,439,808"): ("gpt2", "clone"),
    ("README.md", "124M"): ("gpt2", "clone"),
    ("README.md", "355M"): ("gpt2-medium", "clone"),
    ("README.md", "774M"): ("gpt2-large", "clone"),
    ("README.md", "1.56B"): ("gpt2-xl", "clone"),
    ("README.md", "17.7M"): ("bench-base.yaml", "clone"),
    ("README.md", "17,670,400"): ("bench-base.yaml", "clone"),  # the table's full fine-tune trains them all
    ("gpt2.yaml", "124M"): ("configs/gpt2.yaml", "clone"),
    ("small.yaml", "30M"): ("configs/small.yaml", "clone"),
    ("README.md", "7,171,328"): ("llama-tiny", "clone"),
    ("README.md", "134,515,008"): ("smollm-135m", "clone"),
    ("README.md", "1,100,048,384"): ("tinyllama-1.1b", "clone"),
}


def stated_counts() -> set[tuple[str, str]]:
    found = set()
    for path in DOCS:
        for match in STATED.finditer(path.read_text(encoding="utf-8")):
            found.add((path.name, match.group(1) or match.group(2)))
    return found


def agrees(stated: str, params: int) -> bool:
    """As precise as it is written: 0.8M to a tenth of a million, 124,439,808 exactly."""
    if stated[-1] in "MB":
        scale = 1e6 if stated[-1] == "M" else 1e9
        number = stated[:-1]
        decimals = len(number.partition(".")[2])
        return round(params / scale, decimals) == float(number)
    return params == int(stated.replace(",", ""))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clone/: the repository's configs, as a fresh clone has them; quickstart/: the same beside the
    quick start's data."""
    root = tmp_path_factory.mktemp("counts")
    for name in ("clone", "quickstart"):
        shutil.copytree(ROOT / "configs", root / name / "configs")
        (root / name / "bench-base.yaml").write_text(BENCH_BASE)
    prepare([], root / "quickstart" / "data" / "default", tokenizer="char", progress=False)
    return root


def test_every_stated_count_is_listed() -> None:
    missing = stated_counts() - set(CLAIMS)
    assert not missing, f"parameter counts without a CLAIMS entry (add the model they describe): {missing}"
    gone = set(CLAIMS) - stated_counts() - {("README.md", "17,670,400")}  # that one is in a table
    assert not gone, f"CLAIMS entries no longer in the docs: {gone}"


@pytest.mark.parametrize(("doc", "stated"), sorted(CLAIMS))
def test_stated_count_equals_gptkit_info(doc: str, stated: str, workdir: Path, monkeypatch) -> None:
    target, folder = CLAIMS[(doc, stated)]
    monkeypatch.chdir(workdir / folder)
    params = info(target)["params"]
    assert agrees(stated, params), f"{doc} says {stated} for {target}, gptkit info says {params:,}"


@pytest.mark.parametrize(
    "shape",
    [
        {"preset": "gpt2", "vocab_size": 50257},
        {"preset": "tiny", "vocab_size": 97, "bias": False},
        {"n_layer": 3, "n_head": 2, "n_embd": 48, "block_size": 20, "vocab_size": 1000},
    ],
)
def test_the_count_from_the_shape_equals_the_models(shape: dict) -> None:
    """info counts presets and configs without building the model (no torch): the same numbers."""
    import torch

    from gptkit.config import ModelConfig
    from gptkit.model import GPT

    config = ModelConfig(**shape)
    with torch.device("meta"):
        model = GPT(config)
    assert config.num_params() == model.num_params()
    assert config.num_params(include_position=False) == model.num_params(include_position=False)
