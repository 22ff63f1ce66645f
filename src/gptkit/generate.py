"""The sampler: text from a model over its key/value cache.

One sampler serves the trainer's samples, the CLI, chat, the server and the Python API.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gptkit.console import notice
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer


def filter_logits(logits: Tensor, temperature: float, top_k: int | None) -> Tensor:
    """Scale by temperature and keep the top-k logits (the rest -inf); rows are sequences."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


@torch.inference_mode()
def sample_ids(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    stop_id: int | None = None,
) -> list[int]:
    """New token ids after `prompt` (temperature 0 = greedy), stopping early at `stop_id`.

    Past the context length the cache restarts from the most recent half-context of tokens (a
    sliding window in steps of half a context, so each restart costs one prefill).
    """
    if not prompt:
        raise GptkitError("the prompt is empty; give at least one token (e.g. a newline)")
    block = model.config.block_size
    if len(prompt) > block:
        notice(f"prompt of {len(prompt)} tokens keeps its last {block} (the model's context)")
        prompt = prompt[-block:]
    generator = torch.Generator(device=model.device)
    if seed is not None:
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        tokens = list(prompt)
        cache = model.new_cache(1)
        logits, _ = model(torch.tensor([tokens], device=model.device), cache=cache)
        new: list[int] = []
        for _ in range(max_new_tokens):
            last = logits[0, -1].float()
            if temperature == 0:
                next_id = int(torch.argmax(last))
            else:
                probs = torch.softmax(filter_logits(last, temperature, top_k), dim=-1)
                next_id = int(torch.multinomial(probs, 1, generator=generator))
            new.append(next_id)
            tokens.append(next_id)
            if next_id == stop_id:
                break
            if cache.pos == block:  # context full: restart from the recent half
                cache.reset()
                logits, _ = model(torch.tensor([tokens[-(block // 2) :]], device=model.device), cache=cache)
            else:
                logits, _ = model(torch.tensor([[next_id]], device=model.device), cache=cache)
        return new
    finally:
        model.train(was_training)


def sample_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> str:
    """The prompt's continuation as text, stopping at the end-of-text token."""
    ids = sample_ids(
        model, tokenizer.encode(prompt), max_new_tokens, temperature, top_k, seed, stop_id=tokenizer.eot_id
    )
    if ids and ids[-1] == tokenizer.eot_id:
        ids = ids[:-1]
    return tokenizer.decode(ids)
