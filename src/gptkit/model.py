"""GPT-2 in PyTorch, readable top to bottom.

The architecture is the one of "Language Models are Unsupervised Multitask Learners" (Radford et al.,
2019) as implemented by OpenAI's release and by nanoGPT:

    token embedding + learned position embedding
    -> n_layer x Block: x + attn(ln_1(x)), then x + mlp(ln_2(x))     (pre-LayerNorm residual blocks)
    -> final LayerNorm -> lm_head (shares its weight with the token embedding)

Module names match HuggingFace's GPT-2 (`transformer.h.0.attn.c_attn.weight`, ...) so that weights can
be exported and imported by renaming nothing. HF's Conv1D stores its weights transposed compared with
our nn.Linear; an exporter only has to transpose `c_attn`, `c_proj` and `c_fc` weights.

For generation, `GPT.new_cache` makes a `KVCache`: the keys and values of tokens already seen, so
each new token costs one position of work instead of re-running the whole prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptkit.config import ModelConfig, validate
from gptkit.errors import GptkitError

IGNORE_INDEX = -100  # targets with this value are left out of the loss (F.cross_entropy's default)
LAYER_NORM_EPS = 1e-5  # GPT-2's value
LOSS_CHUNK_ELEMENTS = 2**27  # fused loss: logits of at most this many entries exist at a time (512 MiB fp32)


class KVCache:
    """Keys and values of past positions, for incremental decoding.

    Preallocated once: layer i's keys live in `k[i]` of shape (B, n_head, max_len, head_dim), and the
    first `pos` positions along dim 2 are filled. A forward pass with T new tokens writes positions
    [pos, pos + T) in every layer, then `advance(T)` moves the counter (done by `GPT.forward`).
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

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    @property
    def max_len(self) -> int:
        return self.k[0].size(2)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new keys/values (B, n_head, T, head_dim) of `layer`; return all keys/values so far."""
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        """Forget everything (the tensors are reused; stale values are never read)."""
        self.pos = 0


def causal_mask(t_new: int, t_past: int, device: torch.device) -> tuple[Tensor | None, bool]:
    """(attn_mask, is_causal) for scaled_dot_product_attention: t_new queries after t_past cached keys.

    SDPA's `is_causal=True` aligns the triangle to the top-left corner, which is only right when
    queries and keys start at the same position, i.e. with no past keys. Otherwise we build the mask.
    """
    if t_past == 0:
        return None, True
    if t_new == 1:  # the newest token may look at every key, including itself
        return None, False
    # query i sits at absolute position t_past + i and may see keys 0 .. t_past + i (True = attend)
    mask = torch.ones(t_new, t_past + t_new, dtype=torch.bool, device=device).tril(diagonal=t_past)
    return mask, False


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits `x @ weight[:vocab_size].T`, with its gradient found in forward.

    The same numbers as `F.cross_entropy(F.linear(x, weight[:vocab_size]), targets)`, but cheaper in
    training: the logits (N x vocab, the largest tensor of a small GPT) are made a chunk of rows at a
    time and turned in place into their gradient, softmax - one_hot, right away, so nothing of that
    size is kept for backward or copied between dtypes more than once. Backward only scales the two
    gradients by the incoming one. `dtype` is the matmul precision (bf16 under autocast); the softmax
    is computed in fp32 as with autocast. The gradient of padding rows (>= vocab_size) is zero.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        targets: Tensor,
        vocab_size: int,
        dtype: torch.dtype,
        chunk_elements: int = LOSS_CHUNK_ELEMENTS,
    ) -> Tensor:
        n = x.size(0)
        w = weight[:vocab_size].to(dtype)  # a contiguous view in fp32; the copy autocast would make in bf16
        valid = (targets != IGNORE_INDEX).unsqueeze(1)
        safe = targets.unsqueeze(1).masked_fill(~valid, 0)
        xd = (x * valid).to(dtype)  # ignored rows zeroed: they add nothing to the weight's gradient
        grad_x = torch.empty_like(xd)
        grad_w = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype)
        grad_w[vocab_size:].zero_()
        total = torch.zeros((), device=x.device, dtype=torch.float32)
        rows = max(1, chunk_elements // vocab_size)
        for s in range(0, n, rows):
            e = min(n, s + rows)
            logp = torch.log_softmax(xd[s:e] @ w.T, dim=1, dtype=torch.float32)
            logp_t = logp.gather(1, safe[s:e])
            total -= (logp_t * valid[s:e]).sum()
            if dtype == torch.float32:
                grad = logp.exp_()  # softmax, in place
            else:
                grad = torch.exp(logp, out=torch.empty(logp.shape, device=x.device, dtype=dtype))
            del logp
            grad.scatter_(1, safe[s:e], torch.expm1(logp_t).to(dtype))  # p - 1 at the target, precisely
            torch.mm(grad, w, out=grad_x[s:e])
            if s == 0 and grad_w.dtype == dtype:
                torch.mm(grad.T, xd[s:e], out=grad_w[:vocab_size])
            elif s == 0:
                grad_w[:vocab_size].copy_(grad.T @ xd[s:e])
            else:
                grad_w[:vocab_size] += grad.T @ xd[s:e]
        count = valid.sum()
        # Kept as attributes, not saved tensors: backward scales them in place and lets them go.
        ctx.grads = (grad_x.mul_(valid), grad_w, count, x.dtype)
        return total / count

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("the fused loss can be differentiated once (retain_graph is not supported)")
        grad_x, grad_w, count, x_dtype = ctx.grads
        ctx.grads = None
        scale = grad_loss / count
        return grad_x.to(x_dtype).mul_(scale), grad_w.mul_(scale), None, None, None, None


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
    """Multi-head self-attention where each position sees only itself and earlier positions."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.layer_idx = layer_idx  # which slot of a KVCache belongs to this layer
        # one matmul computes queries, keys and values together ("fused qkv")
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): heads become a batch dimension
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))

        t_past = 0
        if cache is not None:
            t_past = cache.pos
            k, v = cache.update(self.layer_idx, k, v)
        mask, is_causal = causal_mask(T, t_past, x.device)

        dropout = self.dropout if self.training else 0.0
        if _attend_in_fp32(q, k):
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), attn_mask=mask, is_causal=is_causal, dropout_p=dropout
                )
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: widen 4x, GELU, project back."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # the approximation GPT-2 was trained with
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Transformer block with LayerNorm before each sublayer (pre-LN), which trains stably when deep."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT-2 language model: token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise GptkitError("model.vocab_size is not set; set it (e.g. 50257 for GPT-2's tokenizer)")
        self.config = config
        # The embedding table is padded to a multiple of pad_vocab_multiple rows because matmuls with
        # such shapes run faster; the extra rows are never looked up and their logits are cut off.
        vocab = config.padded_vocab_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        # Weight tying: the output projection reuses the token embedding (one tensor, two roles).
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

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def num_params(self, include_position: bool = True) -> int:
        """Number of parameters as HF counts them: tied weights once, padding rows not at all."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        if not include_position:
            n -= self.transformer.wpe.weight.numel()
        return n

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty key/value cache for up to `max_len` positions (default: block_size)."""
        c = self.config
        max_len = c.block_size if max_len is None else max_len
        if not 1 <= max_len <= c.block_size:
            raise GptkitError(f"cache max_len {max_len} must be between 1 and block_size ({c.block_size})")
        head_dim = c.n_embd // c.n_head
        return KVCache(c.n_layer, batch_size, c.n_head, head_dim, max_len, self.device, self.dtype)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        cache: KVCache | None = None,
        *,
        return_logits: bool = True,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T), and the mean loss if `targets` given.

        With a `cache`, `idx` holds only the new tokens; they are placed after the cached positions.
        `return_logits=False` with `targets` returns (None, loss), computed by `LinearCrossEntropy`
        without keeping the logits: what a training step wants (the same loss, a faster step).
        """
        B, T = idx.shape
        pos = self._check_length(B, T, cache)

        positions = torch.arange(pos, pos + T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, cache)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.advance(T)  # every layer has written its keys/values for these T positions

        # Only the first vocab_size rows of the (padded) head: softmax, loss and sampling never see
        # padded ids. A row slice is contiguous, so the logits come out contiguous too (cutting
        # columns off padded logits instead would make the loss copy them).
        head = self.lm_head.weight[: self.config.vocab_size]
        if targets is not None and not return_logits and torch.is_grad_enabled() and x.requires_grad:
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
            with torch.autocast(device, enabled=False):
                loss = LinearCrossEntropy.apply(
                    x.flatten(0, 1), self.lm_head.weight, targets.flatten(), self.config.vocab_size, dtype
                )
            return None, loss
        logits = F.linear(x, head)

        loss = None
        if targets is not None:
            # upcast: cross-entropy of fp16/bf16 logits loses precision (a no-op for fp32)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return (logits if return_logits or targets is None else None), loss

    def _check_length(self, batch_size: int, t_new: int, cache: KVCache | None) -> int:
        """Raise a clear error if the tokens do not fit; return the position of the first new token."""
        pos = 0 if cache is None else cache.pos
        block_size = self.config.block_size
        if pos + t_new > block_size:
            where = f"{t_new} tokens" if cache is None else f"{pos} cached + {t_new} new tokens"
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
