"""Config: YAML files, dotted overrides, presets, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gptkit.config import (
    MODEL_PRESETS,
    ModelConfig,
    PrepareConfig,
    RunConfig,
    load_config,
    parse_overrides,
    to_yaml,
    validate,
)
from gptkit.errors import GptkitError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_load_and_dotted_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  n_layer: 3\n  n_head: 2\n  n_embd: 64\ndata:\n  path: somewhere\n")
    config = load_config(path, ["model.n_layer=5", "model.dropout=0.25", "data.path=else"])
    assert config.model.n_layer == 5 and isinstance(config.model.n_layer, int)
    assert config.model.n_head == 2 and config.model.n_embd == 64
    assert config.model.dropout == 0.25
    assert config.data.path == "else"


def test_overrides_parse_yaml_scalars() -> None:
    tree = parse_overrides(["a.b=3", "a.c=3e-4", "a.d=true", "a.e=null", "f=hello world"])
    assert tree == {"a": {"b": 3, "c": "3e-4", "d": True, "e": None}, "f": "hello world"}
    # a scientific-notation string still validates as a float through pydantic
    assert validate(RunConfig, {"model": {"dropout": "1e-1"}}).model.dropout == pytest.approx(0.1)


def test_override_without_equals_is_an_error() -> None:
    with pytest.raises(GptkitError, match=r"key=value"):
        parse_overrides(["model.n_layer"])


def test_typo_suggests_the_closest_key(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  n_layr: 4\n")
    with pytest.raises(GptkitError) as e:
        load_config(path)
    msg = str(e.value)
    assert "unknown key 'model.n_layr'" in msg and "did you mean 'n_layer'" in msg
    assert "\n" not in msg
    with pytest.raises(GptkitError, match=r"unknown key 'modle'.*did you mean 'model'"):
        load_config(None, ["modle.n_layer=4"])


def test_invalid_values_name_the_key() -> None:
    with pytest.raises(
        GptkitError, match=r"model\.n_layer: Input should be greater than or equal to 1 \(got 0\)"
    ):
        load_config(None, ["model.n_layer=0"])
    with pytest.raises(GptkitError, match=r"model\.dropout: .*less than 1"):
        load_config(None, ["model.dropout=1.5"])
    with pytest.raises(GptkitError, match=r"model\.n_head: .*valid integer"):
        load_config(None, ["model.n_head=many"])
    with pytest.raises(GptkitError, match=r"divisible by n_head"):
        load_config(None, ["model.n_embd=100", "model.n_head=3"])
    with pytest.raises(GptkitError, match=r"unknown preset 'gpt3'"):
        load_config(None, ["model.preset=gpt3"])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(GptkitError, match=r"not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(GptkitError, match=r"not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(GptkitError, match=r"mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_preset_fills_shape_and_explicit_keys_win() -> None:
    config = ModelConfig(preset="gpt2", n_layer=2)
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size) == (2, 12, 768, 1024)
    for name, shape in MODEL_PRESETS.items():
        config = ModelConfig(preset=name)
        assert {k: getattr(config, k) for k in shape} == shape


def test_padded_vocab_size() -> None:
    assert ModelConfig(vocab_size=50257).padded_vocab_size == 50304
    assert ModelConfig(vocab_size=64).padded_vocab_size == 64
    assert ModelConfig(vocab_size=65, pad_vocab_multiple=1).padded_vocab_size == 65
    with pytest.raises(GptkitError, match=r"vocab_size is not set"):
        _ = ModelConfig().padded_vocab_size


def test_resolved_config_round_trips_through_yaml() -> None:
    config = load_config(None, ["model.preset=small", "model.vocab_size=100"])
    again = validate(RunConfig, yaml.safe_load(to_yaml(config)))
    assert again == config


def test_prepare_settings() -> None:
    assert PrepareConfig(tokenizer="bpe").vocab_size == 8192
    with pytest.raises(GptkitError, match=r"vocab_size applies to the bpe tokenizer only"):
        validate(PrepareConfig, {"tokenizer": "char", "vocab_size": 500})
    for bad in ("sentencepiece", "model:"):
        with pytest.raises(GptkitError, match=rf"unknown tokenizer '{bad}'; use gpt2, char, bpe or model:"):
            validate(PrepareConfig, {"tokenizer": bad})
    assert PrepareConfig(tokenizer="model:runs/llama").tokenizer == "model:runs/llama"
    with pytest.raises(GptkitError, match=r"val_fraction"):
        validate(PrepareConfig, {"val_fraction": 1.0})


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, RunConfig)


def test_configs_folder_is_not_empty() -> None:
    assert len(list((ROOT / "configs").glob("*.yaml"))) >= 3
