"""What trains in a fine-tune: the module layout of each method, rebuilt the same way everywhere.

`apply_method` runs when fine-tuning starts and again when any of its checkpoints is loaded, so
training, resuming, sampling and evaluation all see the same modules and parameter names.
"""

from __future__ import annotations

from gptkit.config import FinetuneConfig
from gptkit.finetuning import lora
from gptkit.finetuning.prompt_tuning import add_soft_prompt
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer


def apply_method(model: GPT, finetune: FinetuneConfig, tokenizer: Tokenizer | None = None) -> GPT:
    """The model to train: with LoRA layers (base frozen, in place), with a soft prompt (model
    frozen, a `PromptTunedGPT` around the same modules), or as it is (full fine-tuning)."""
    if finetune.method == "lora":
        lora.add_lora(model, finetune.lora)
    elif finetune.method == "prompt":
        return add_soft_prompt(model, finetune.prompt_tokens, finetune.prompt_init, tokenizer)
    return model
