"""The CLI: help lists each option with its default, commands call the API, errors are one line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli import gptkit_cli

from gptkit.cli import COMMANDS, Formatter, build_parser


def gptkit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return gptkit_cli(*args, cwd=cwd)


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_top_level_help_lists_the_commands() -> None:
    out = gptkit("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_shows_its_default(name: str) -> None:
    top = subparsers()[name]
    actions = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    nested = [([name, sub], p) for a in actions for sub, p in a.choices.items()]  # gptkit rag index ...
    for argv, parser in nested or [([name], top)]:
        assert parser.formatter_class is Formatter
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or action.required or action.dest == "help":
                continue
            formatter = parser._get_formatter()
            help_text = formatter._expand_help(action) if action.help else ""
            option = f"{' '.join(argv)} {action.option_strings[0]}"
            assert "default: " in help_text, f"{option} shows no default"
            assert help_text.split("(default")[0].strip(), f"{option} has no help text"
        shown = gptkit(*argv, "--help").stdout
        assert shown.count("(default: ") == text.count("(default: ") > 0


def test_prepare_then_info_through_the_cli(tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"body": f"hello number {i}"}) + "\n" for i in range(50)))
    out = gptkit(
        "prepare",
        str(src),
        "--out",
        str(tmp_path / "d"),
        "--text-field",
        "body",
        "--tokenizer",
        "char",
        "--val-fraction",
        "0.2",
        "--workers",
        "2",
        "--no-progress",
    )
    assert out.returncode == 0, out.stderr
    assert "train:" in out.stderr and out.stdout == ""
    info = json.loads(gptkit("info", str(tmp_path / "d"), "--json").stdout)
    assert info["kind"] == "data" and info["tokenizer"]["type"] == "char"
    assert info["splits"]["train"]["documents"] + info["splits"]["val"]["documents"] == 50
    text = gptkit("info", str(tmp_path / "d")).stdout
    assert "tokenizer: char" in text and "documents" in text


def test_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    out = gptkit("prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "d"))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("gptkit: error: source ")
    out = gptkit("prepare", "--out", str(tmp_path / "d"), "--workers", "0")
    assert out.returncode == 2 and "workers: Input should be greater than or equal to 1" in out.stderr
    out = gptkit("prepare", "--out", str(tmp_path / "d"), "--tokenizer", "char", "--vocab-size", "500")
    assert out.returncode == 2 and "vocab_size applies to the bpe tokenizer only" in out.stderr
    assert not (tmp_path / "d").exists()


def test_info_on_a_preset() -> None:
    out = gptkit("info", "gpt2", "--json")
    info = json.loads(out.stdout)
    assert info["params"] == 124_439_808 and info["model"]["n_layer"] == 12
    assert info["params_without_position"] == 124_439_808 - 1024 * 768
    assert "124,439,808" in gptkit("info", "gpt2").stdout
    bad = gptkit("info", "gpt-2")
    assert bad.returncode == 2 and "did you mean 'gpt2'" in bad.stderr


def test_a_reader_that_leaves_early_is_not_an_error_with_a_traceback() -> None:
    """`gptkit info gpt2 | head -1`: the pipe closes before gptkit writes; no traceback, SIGPIPE's code."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptkit", "info", "gpt2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # long before the interpreter has started and written anything
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and stderr == "", stderr


TORCH_PROBE = """
import sys
from gptkit.cli import build_parser, main
build_parser()
try:
    main(sys.argv[1:])
except SystemExit:
    pass
sys.stdout.flush()
print("TORCH_LOADED" if "torch" in sys.modules else "NO_TORCH", file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args",
    [[], ["--help"], ["--version"], ["train", "--help"], ["info", "gpt2"], ["info", "configs/small.yaml"]],
)
def test_parser_help_version_and_info_of_presets_and_configs_do_not_import_torch(args: list[str]) -> None:
    """Start-up stays fast: torch is imported only by commands that run a model."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", TORCH_PROBE, *args], capture_output=True, text=True, cwd=root, timeout=120
    )
    assert out.stderr.strip().endswith("NO_TORCH"), out.stderr[-2000:]
    if args[:1] == ["info"]:
        assert "parameters:" in out.stdout


def test_import_gptkit_reaches_the_subpackages_without_importing_torch_first() -> None:
    code = (
        "import sys, gptkit; assert 'torch' not in sys.modules; "
        "print(gptkit.generate.Chat.__name__, gptkit.generate.SampleSettings.__name__, gptkit.eval.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["Chat", "SampleSettings", "gptkit.eval"]


def test_modes_targets_and_eval_defaults_are_declared_once() -> None:
    """Quantisation modes, export targets and eval defaults were spelled in the CLI, the API, the
    config and the evaluator separately; each is now one declaration in gptkit.config that all use."""
    import inspect

    import gptkit
    from gptkit.config import (
        EVAL_BATCH_SIZE,
        EVAL_DATA_DIR,
        EVAL_MAX_NEW_TOKENS,
        EXPORT_TARGETS,
        QUANTIZE_MODES,
        EvalConfig,
    )
    from gptkit.errors import GptkitError
    from gptkit.eval.run import EvalSettings
    from gptkit.generate.inference import check_quantize

    parsers = subparsers()
    for name in ("sample", "chat", "eval"):
        quantize = next(a for a in parsers[name]._actions if a.dest == "quantize")
        assert tuple(quantize.choices) == QUANTIZE_MODES
    target = next(a for a in parsers["export"]._actions if a.dest == "target")
    assert tuple(target.choices) == EXPORT_TARGETS
    with pytest.raises(GptkitError, match=f"quantize must be {' or '.join(QUANTIZE_MODES)}, not 'int3'"):
        check_quantize("int3")
    with pytest.raises(GptkitError, match=f"export target must be one of {', '.join(EXPORT_TARGETS)}"):
        gptkit.export_model("runs/none", "tflite", "out")

    defaults = vars(parsers["eval"].parse_args(["runs/x"]))
    api = inspect.signature(gptkit.evaluate).parameters
    settings = EvalSettings(["perplexity"])
    fields = EvalConfig.model_fields
    assert defaults["batch_size"] == api["batch_size"].default == settings.batch_size == EVAL_BATCH_SIZE
    assert fields["task_batch_size"].default == EVAL_BATCH_SIZE
    assert defaults["data_dir"] == api["data_dir"].default == settings.data_dir == EVAL_DATA_DIR
    assert fields["task_data"].default == EVAL_DATA_DIR
    assert defaults["max_new_tokens"] == api["max_new_tokens"].default == settings.max_new_tokens
    assert settings.max_new_tokens == EVAL_MAX_NEW_TOKENS
