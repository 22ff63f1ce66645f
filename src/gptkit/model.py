"""GPT-2 in PyTorch, readable top to bottom, with the switches of Llama-style models.

The default architecture is the one of "Language Models are Unsupervised Multitask Learners" (Radford
et al., 2019) as implemented by OpenAI's release and by nanoGPT:

    token embedding + learned position embedding
    -> n_layer x Block: x + attn(ln_1(x)), then x + mlp(ln_2(x))     (pre-LayerNorm residual blocks)
    -> final LayerNorm -> lm_head (shares its weight with the token embedding)

The config's switches swap pieces without changing this shape or the module names (`gptkit.variants`
holds the new pieces): `norm` rmsnorm, `mlp` swiglu, `position` rope (no `wpe`; queries and keys
rotated inside attention), `n_kv_head` < n_head (grouped-query attention: `c_attn` makes n_head query
heads and n_kv_head key/value heads, and the cache stores only the latter), `bias`, `tie_embeddings`.

Module names match HuggingFace's GPT-2 (`transformer.h.0.attn.c_attn.weight`, ...) so that weights can
be exported and imported by renaming nothing. HF's Conv1D stores its weights transposed compared with
our nn.Linear; an exporter only has to transpose `c_attn`, `c_proj` and `c_fc` weights.

`GPT.forward` has one path: ids (or input embeddings) in, logits (or the final hidden states) out,
with an optional cache; `attention_layout` is the one place that makes attention masks and positions.
What training adds is composed around it by its owner: the loss fused with the head
(`gptkit.fused_loss`), packed examples (`gptkit.data.batch`), prompt tuning's vectors
(`gptkit.finetuning.prompt_tuning`, through `inputs_embeds`, as HF/peft do).

For generation, `GPT.new_cache` makes a `KVCache`: the keys and values of tokens already seen, so
each new token costs one position of work instead of re-running the whole prefix.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptkit.config import ModelConfig, validate
from gptkit.errors import GptkitError
from gptkit.variants import Rotary, SwiGLU, rotate

LAYER_NORM_EPS = 1e-5  # GPT-2's value


class KVCache:
    """Keys and values of past positions, for incremental decoding.

    Preallocated once: layer i's keys live in `k[i]` of shape (B, n_kv_head, max_len, head_dim), and the
    first `pos` positions along dim 2 are filled. A forward pass with T new tokens writes positions
    [pos, pos + T) in every layer, then `advance(T)` moves the counter (done by `GPT.forward`).

    Prompts of different lengths share one cache by left padding: `pad[b]` is the number of padding
    positions in front of sequence b. They are never attended to, and position embeddings count
    from each sequence's first real token, so a padded sequence gets the logits it would get alone.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.pos = 0  # number of positions already stored
        self.pad: Tensor | None = None  # (B,) left-padding lengths; None: no padding

    def set_padding(self, pad: Tensor | None) -> None:
        """Declare `pad[b]` leading padding positions in sequence b (before the first forward)."""
        self.pad = None if pad is None or not bool(pad.any()) else pad.to(self.k[0].device)

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    @property
    def max_len(self) -> int:
        return self.k[0].size(2)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new keys/values (B, n_kv_head, T, head_dim) of `layer`; return all keys/values so far."""
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        """Forget everything (the tensors are reused; stale values are never read)."""
        self.pos = 0
        self.pad = None

    def rows(self, n: int) -> KVCache:
        """The first n sequences as a cache of their own that shares this one's storage (a view, so
        a decoder can run a batch whose rows join and leave without copying the cache); its `pos` and
        `pad` are its own, set by whoever steps it."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = [t[:n] for t in self.k], [t[:n] for t in self.v]
        view.pos, view.pad = self.pos, None
        return view


class Layout(NamedTuple):
    """Where each new position sits and what it attends to: what `attention_layout` makes."""

    mask: Tensor | None  # True = attend; (T, S) or (B, 1, T, S); None: plain causal (SDPA's is_causal)
    positions: Tensor  # position ids (T,) or (B, T)


def attention_layout(
    t_new: int, device: torch.device, cache: KVCache | None = None, segments: Tensor | None = None
) -> Layout:
    """The one place that makes attention masks and positions, for t_new positions after the cache's.

    Plain (no cache or an empty one, no padding): mask None, SDPA's `is_causal=True`, whose triangle is
    aligned to the top-left corner (right only without past keys); a single new token sees everything.
    Left padding (`cache.pad`): every query also skips the padding keys, except a padding query's own
    key (a query that sees no key would give NaN, which later layers would carry), and positions count
    from each sequence's first real token, so a padded sequence gets the logits it would get alone.
    `segments` (B, T) numbers several examples packed into each row (equal ids = one example,
    contiguous): each attends only to itself and counts positions from 0, so its loss is what it would
    be alone. Packing is for training: no cache.
    """
    t_past = 0 if cache is None else cache.pos
    pad = None if cache is None else cache.pad
    positions = torch.arange(t_past, t_past + t_new, device=device)
    if segments is not None:
        if cache is not None:
            raise GptkitError("packed segments are for training; they do not combine with a KV cache")
        same = segments[:, :, None] == segments[:, None, :]
        causal = torch.ones(t_new, t_new, dtype=torch.bool, device=device).tril()
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        first = torch.where(starts, positions, 0).cummax(dim=1).values  # where each example starts
        return Layout((same & causal)[:, None], positions - first)
    if pad is None:
        mask = None if t_past == 0 or t_new == 1 else causal_after(t_past, t_new, device)
        return Layout(mask, positions)
    keys = torch.arange(t_past + t_new, device=device)
    real_key = keys >= pad[:, None]  # (B, S)
    own_key = positions[:, None] == keys  # (T, S)
    mask = causal_after(t_past, t_new, device) & real_key[:, None, :] | own_key
    return Layout(mask[:, None], (positions - pad[:, None]).clamp(min=0))  # (B, 1, T, S): every head


def causal_after(t_past: int, t_new: int, device: torch.device) -> Tensor:
    """(t_new, t_past + t_new): query i sits at position t_past + i and sees keys 0 .. t_past + i."""
    return torch.ones(t_new, t_past + t_new, dtype=torch.bool, device=device).tril(diagonal=t_past)


CPU_BF16_ATTENTION_MIN_WORK = 32768  # keys x head_dim from which CPU attention is faster in bf16


def _attend_in_fp32(q: Tensor, k: Tensor) -> bool:
    """Whether to run attention in fp32 although autocast asks for bf16 (CPU, short or narrow heads).

    PyTorch's fused attention kernel for CPUs has a per-block cost in bf16 that fp32 does not have:
    fwd + bwd measured 1.1-3.6x slower in bf16 than in fp32 wherever keys x head_dim <= 16384 (T=128
    with head_dim 32, 64 or 128; T=256 with 32 or 64, ...) and 1.1-1.7x faster from 32768 on (T=1024
    with head_dim 32 or 64, T=256 with 128, ...). fp32 there is also the more precise choice.
    """
    return (
        q.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and k.size(2) * k.size(3) < CPU_BF16_ATTENTION_MIN_WORK
    )


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions.

    With n_kv_head < n_head (grouped-query attention), each key/value head serves n_head / n_kv_head
    consecutive query heads (transformers' `repeat_kv` order); n_kv_head == n_head is plain multi-head.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.dropout = config.dropout
        self.layer_idx = layer_idx  # which slot of a KVCache belongs to this layer
        # one matmul computes queries, keys and values together ("fused qkv"): rows [q; k; v]
        kv_width = self.n_kv_head * self.head_dim
        self.split = (config.n_embd, kv_width, kv_width)
        self.c_attn = nn.Linear(config.n_embd, sum(self.split), bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        cache: KVCache | None = None,
        mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """`mask` comes from `attention_layout`, `rotary` (RoPE's cos and sin) from `Rotary`: both made
        once per forward pass, not once per layer."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.split, dim=2)
        # (B, T, heads * head_dim) -> (B, heads, T, head_dim): heads become a batch dimension
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if rotary is not None:
            q, k = rotate(q, rotary), rotate(k, rotary)

        is_causal = mask is None and (cache is None or cache.pos == 0)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)

        dropout = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head
        if _attend_in_fp32(q, k):
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(
                    q.float(),
                    k.float(),
                    v.float(),
                    attn_mask=mask,
                    is_causal=is_causal,
                    dropout_p=dropout,
                    enable_gqa=gqa,
                )
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout, enable_gqa=gqa
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: widen (4x), GELU, project back."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.hidden, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # the approximation GPT-2 was trained with
        self.c_proj = nn.Linear(config.hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


def norm(config: ModelConfig) -> nn.Module:
    """The normalisation `config.norm` names: GPT-2's LayerNorm or Llama's RMSNorm (no mean, no bias)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


MLPS: dict[str, type[nn.Module]] = {"gelu": MLP, "swiglu": SwiGLU}  # by config.mlp


class Block(nn.Module):
    """Transformer block with a norm before each sublayer (pre-LN), which trains stably when deep."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = norm(config)
        self.mlp = MLPS[config.mlp](config)

    def forward(
        self,
        x: Tensor,
        cache: KVCache | None = None,
        mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, mask, rotary)
        x = x + self.mlp(self.ln_2(x))
        return x


class LMHead(nn.Linear):
    """The output layer: logits for the real vocabulary only.

    Its weight is the (padded) token embedding; only the first vocab_size rows are used, so softmax,
    loss and sampling never see padded ids. A row slice is contiguous, so the logits come out
    contiguous too (cutting columns off padded logits instead would make the loss copy them). A
    quantised head (gptkit.generate.cpu.quantize) holds only those rows and is called the same way.
    """

    def __init__(self, n_embd: int, padded_vocab_size: int, vocab_size: int) -> None:
        super().__init__(n_embd, padded_vocab_size, bias=False)
        self.vocab_size = vocab_size

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight[: self.vocab_size])


class GPT(nn.Module):
    """GPT-2 (or Llama-style) language model: token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise GptkitError("model.vocab_size is not set; set it (e.g. 50257 for GPT-2's tokenizer)")
        self.config = config
        # The embedding table is padded to a multiple of pad_vocab_multiple rows because matmuls with
        # such shapes run faster; the extra rows are never looked up and their logits are cut off.
        vocab = config.padded_vocab_size
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(vocab, config.n_embd)))
        if config.position == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.transformer.drop = nn.Dropout(config.dropout)
        self.transformer.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.transformer.ln_f = norm(config)
        # RoPE's frequencies (no weights); None: positions are learned embeddings (wpe)
        self.rotary = Rotary(config) if config.position == "rope" else None
        self.lm_head: nn.Module = LMHead(config.n_embd, vocab, config.vocab_size)
        if config.tie_embeddings:  # the output projection reuses the token embedding (one tensor, two roles)
            self.lm_head.weight = self.transformer.wte.weight
        self._init_weights()

    @classmethod
    def from_preset(cls, name: str, vocab_size: int, **overrides: object) -> GPT:
        """E.g. `GPT.from_preset("gpt2", 50257, dropout=0.1)`."""
        data = {"preset": name, "vocab_size": vocab_size, **overrides}
        return cls(validate(ModelConfig, data, source="GPT.from_preset"))

    def _init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, smaller residual projections."""
        if self.transformer.wte.weight.is_meta:  # shapes only (counting parameters): no values to set
            return
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Each block adds two projections onto the residual stream; scaling them by 1/sqrt(2 n_layer)
        # keeps the variance of the stream from growing with depth (GPT-2 paper, section 2.3).
        std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=std)
        # Padding rows are unused; zero keeps them inert (they get no gradient, so they stay zero).
        with torch.no_grad():
            self.transformer.wte.weight[self.config.vocab_size :].zero_()
            self.lm_head.weight[self.config.vocab_size :].zero_()

    @property
    def device(self) -> torch.device:
        return self.transformer.ln_f.weight.device  # ln_f: never quantised (wte may be)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.ln_f.weight.dtype

    def num_params(self, include_position: bool = True, trainable: bool = False) -> int:
        """Number of parameters as HF counts them: tied weights once, padding rows not at all.
        `trainable`: only those that require gradients, counted the same way, so never more than all."""
        padding = (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        # parameters() yields a shared tensor once
        n = sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable)
        embeddings = {id(t): t for t in (self.transformer.wte.weight, self.lm_head.weight)}.values()
        n -= sum(padding for t in embeddings if not trainable or t.requires_grad)
        wpe = self.transformer.wpe.weight if "wpe" in self.transformer else None
        if not include_position and wpe is not None and (not trainable or wpe.requires_grad):
            n -= wpe.numel()
        return n

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty key/value cache for up to `max_len` positions (default: block_size)."""
        c = self.config
        max_len = c.block_size if max_len is None else max_len
        if not 1 <= max_len <= c.block_size:
            raise GptkitError(f"cache max_len {max_len} must be between 1 and block_size ({c.block_size})")
        return KVCache(c.n_layer, batch_size, c.kv_heads, c.head_dim, max_len, self.device, self.dtype)

    n_prefix = 0  # positions an input prefix takes before the tokens (prompt tuning's vectors)

    def tokens_that_fit(self) -> int:
        """How many tokens one forward pass can read: the context less the positions of a prefix.
        The one place for this fact: fine-tuning data, the sampler, chat and eval all ask here."""
        return self.config.block_size - self.n_prefix

    def forward(
        self,
        idx: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        cache: KVCache | None = None,
        layout: Layout | None = None,
        last_only: bool = False,
        head: bool = True,
    ) -> Tensor:
        """Next-token logits (B, T, vocab_size) for token ids `idx` (B, T), or for `inputs_embeds`
        (B, T, n_embd) in their place (how prompt tuning puts its vectors in).

        With a `cache`, the input holds only the new positions; they are placed after the cached
        ones. `layout` (from `attention_layout`) overrides the attention mask and positions made from
        the cache (packed examples). `last_only`: the last position only (B, 1, ...), all that
        sampling needs after a prompt. `head=False`: the final hidden states (B, T, n_embd) instead of
        logits, for a loss fused with the head (`gptkit.fused_loss`); still a call of the module, so
        that DDP, FSDP and torch.compile see it.
        """
        x = self.transformer.wte(idx) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        self.check_length(B, T, cache)
        mask, positions = layout or attention_layout(T, x.device, cache)
        rotary = None if self.rotary is None else self.rotary(positions)
        if rotary is None:
            x = x + self.transformer.wpe(positions)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, cache, mask, rotary)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.advance(T)  # every layer has written its keys/values for these T positions
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x) if head else x

    def check_length(self, batch_size: int, t_new: int, cache: KVCache | None) -> int:
        """Raise a clear error if the tokens do not fit; return the position of the first new token."""
        pos = 0 if cache is None else cache.pos
        block_size = self.config.block_size
        # a sequence's length counts from its first real position: left padding is not part of it
        first = 0 if cache is None or cache.pad is None else int(cache.pad.min())
        if pos + t_new - first > block_size:
            where = f"{t_new} tokens" if cache is None else f"{pos - first} cached + {t_new} new tokens"
            raise GptkitError(
                f"sequence of {where} exceeds block_size ({block_size}); crop the input to the last "
                f"{block_size} tokens or use a model with a larger block_size"
            )
        if cache is not None:
            if pos + t_new > cache.max_len:
                raise GptkitError(
                    f"{pos} cached + {t_new} new tokens exceed the cache's max_len ({cache.max_len}); "
                    "make the cache with a larger max_len"
                )
            if batch_size != cache.batch_size:
                raise GptkitError(
                    f"batch of {batch_size} sequences does not match the cache's batch_size "
                    f"({cache.batch_size}); make a new cache with model.new_cache({batch_size})"
                )
        return pos
