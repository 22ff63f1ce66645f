"""Helpers of the retrieval tests: the CLI in a subprocess, and a small GPT-2-tokenizer checkpoint."""

from __future__ import annotations

from pathlib import Path

from cli import gptkit_cli
from conftest import shared_file, tiny_gpt

__all__ = ["gptkit_cli", "save_model", "shared_file"]


def save_model(path: Path, block_size: int, template: dict | None) -> Path:
    from gptkit.checkpoint import save_checkpoint
    from gptkit.config import load_config
    from gptkit.tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer()
    model = tiny_gpt(tok.vocab_size, block_size=block_size)
    config = load_config(
        None,
        [
            "model.n_layer=2",
            "model.n_head=2",
            "model.n_embd=32",
            f"model.block_size={block_size}",
            f"model.vocab_size={tok.vocab_size}",
        ],
    )
    return save_checkpoint(
        path,
        model_state=model.state_dict(),
        config=config.model_dump(mode="json"),
        tokenizer=tok.describe(),
        progress={"step": 1},
        chat_template=template,
    )
