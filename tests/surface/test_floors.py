"""The floor plan (DESIGN.md): imports flow down, checked on the source and on what importing loads.

The floors are declared here, once, lowest first. A module may import its own floor and the floors
below it, never one above. An import inside a function hides an arrow from readers and from
`import_cycles.py`, so it is allowed only for an optional or heavy third-party dependency, or in the
surface, whose lazy imports keep `gptkit --help` free of torch.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "gptkit"

# Lowest first; a name is a top-level module or subpackage of gptkit. Two differences from DESIGN.md's
# table, where the code shows the better shape:
# - generate/ sits below training/: the trainer writes its samples with the one Sampler, and the
#   sampler needs nothing above core.
# - loading (run | checkpoint | HF folder -> model) sits between interop/ and eval/, not at the
#   surface: eval loads every checkpoint of a run through it, and it needs interop.hf below it.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    (
        "leaves",
        ("version", "errors", "console", "files", "layout", "locks", "config", "tokenizer", "templates"),
    ),
    ("core", ("variants", "model", "fused_loss", "device", "runtime")),
    ("data", ("data",)),
    ("state", ("checkpoint",)),
    ("adapters", ("finetuning",)),
    ("generation", ("generate",)),
    ("loop", ("training", "tracking")),
    ("interop", ("interop",)),
    ("loader", ("loading",)),
    ("use", ("eval", "rag")),
    ("serving", ("serve",)),
    ("surface", ("describe", "api", "cli", "__init__", "__main__")),
]
SURFACE = "surface"

# Arrows that other branches of issue 16 remove; the lead deletes each entry as its branch merges.
# (importer, imported): why it is still here.
KNOWN: dict[tuple[str, str], str] = {}

# Top-level names of third-party (and a few standard) modules a function may import when it needs them.
OPTIONAL = {
    "gguf", "importlib", "matplotlib", "mlflow", "onnx", "onnxruntime", "onnxscript", "pydoc_data",
    "readline", "safetensors", "tensorboard", "torch", "transformers", "wandb",
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(module: str) -> int:
    """The floor index of a gptkit module; the package itself is its __init__, on the surface."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    for i, (_, names) in enumerate(FLOORS):
        if name in names:
            return i
    raise AssertionError(f"{module} has no floor: add {name!r} to FLOORS in {__file__}")


FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) of every import in `module`'s source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolved against the importing package
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for a in child.names:  # `from gptkit.training import distributed` names a module
                    sub = f"{base}.{a.name}"
                    found.append((sub if sub in MODULES else base, child.lineno, in_function))
            visit(
                child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            )

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def arrows() -> list[tuple[str, str, int, str]]:
    """(importer, imported, line, what is wrong) of every import that breaks the floor plan."""
    wrong: list[tuple[str, str, int, str]] = []
    for module in MODULES:
        surface = FLOORS[floor_of(module)][0] == SURFACE
        for target, line, in_function in imports(module):
            if target == "gptkit" or target.startswith("gptkit."):
                if floor_of(target) > floor_of(module):
                    wrong.append(
                        (module, target, line, f"imports up, to floor {FLOORS[floor_of(target)][0]}")
                    )
                elif in_function and not surface:
                    wrong.append((module, target, line, "imports gptkit inside a function"))
            elif in_function and target.split(".")[0] not in OPTIONAL:
                wrong.append((module, target, line, "imports a non-optional module inside a function"))
    return list(dict.fromkeys(wrong))  # `from x import a, b` is one arrow


def test_every_import_flows_down() -> None:
    new = [
        f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {m} -> {t}: {why}"
        for m, t, line, why in arrows()
        if (m, t) not in KNOWN
    ]
    assert not new, "imports against the floor plan:\n" + "\n".join(new)


def test_known_arrows_are_still_there() -> None:
    """An arrow another branch removed leaves KNOWN too, so the list cannot hide a new one."""
    present = {(m, t) for m, t, _, _ in arrows()}
    gone = [f"{m} -> {t} ({why})" for (m, t), why in KNOWN.items() if (m, t) not in present]
    assert not gone, "remove from KNOWN, these imports are gone:\n" + "\n".join(gone)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import gptkit\n", ("gptkit", False)),
        ("def f():\n    from gptkit.training import trainer\n", ("gptkit.training.trainer", True)),
        ("from gptkit.training.trainer import Trainer\n", ("gptkit.training.trainer", False)),
    ],
)
def test_the_walker_sees_every_kind_of_import(
    source: str, expected: tuple[str, bool], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The checker itself: a module-level `import gptkit` and a function's import are both found."""
    fake = tmp_path / "checkpoint_fake.py"
    fake.write_text(source)
    monkeypatch.setitem(MODULES, "gptkit.checkpoint.fake", fake)
    (target, _, in_function), *_ = imports("gptkit.checkpoint.fake")
    assert (target, in_function) == expected
    assert floor_of(target) > floor_of("gptkit.checkpoint.fake")


def loaded_after_import(module: str) -> list[str]:
    """The gptkit modules a fresh interpreter holds after importing `module`."""
    code = f"import sys, {module}; print(__import__('json').dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return [m for m in json.loads(out) if m.startswith("gptkit")]


def test_instruction_data_does_not_load_the_sampler() -> None:
    loaded = loaded_after_import("gptkit.finetuning.instructions")
    assert "gptkit.templates" in loaded
    assert not [m for m in loaded if m.startswith("gptkit.generate")], loaded


def test_checkpoints_load_without_fine_tuning_or_interop() -> None:
    loaded = loaded_after_import("gptkit.checkpoint")
    assert not [m for m in loaded if m.split(".")[1:2] in (["finetuning"], ["interop"], ["model"])], loaded
