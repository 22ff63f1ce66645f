"""A whole decoding step of an fp32 GPT on the CPU in one call of gptkit's kernel (`gptkit_decode`).

Decoding one token runs about 30 small PyTorch operations per layer between the matrix-vector
products, and each runs with the caches that the streaming weights have just flushed: for GPT-2
124M on this project's CPU about 4 ms of an 18 ms step. `gptkit_decode` in `cpu_kernels.c` does
the step's arithmetic (LayerNorms, products, attention over the key/value cache, GELU, residuals,
the head) in one OpenMP region, with the same weights and the same `KVCache`, so the step costs
little more than streaming the weights. `GPT.forward` stays the reference: the tests hold the two
to fp32 rounding, with left padding, several sequences, and models without biases.

The sampler uses it for models that `gptkit.generate.cpu_linear.use_cpu_linear` prepared (what
`gptkit.load` does for fp32 models on the CPU) when the kernel is built; everything else decodes
through `GPT.forward`.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from gptkit.generate.cpu_kernel import pointer
from gptkit.generate.cpu_linear import CPULinear
from gptkit.model import GPT, KVCache

# per layer, in the order of the layer's pointers in cpu_kernels.c (then its cached keys and values)
LAYER_FIELDS = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)


class CPUDecoder:
    """`step(ids, cache)`: the logits after one new token per sequence, like `GPT.forward` with a cache."""

    def __init__(self, model: GPT, lib: ctypes.CDLL) -> None:
        self.model, self.lib = model, lib
        self.weights: list[Tensor | None] = []  # kept referenced: the kernel holds their addresses
        for block in model.transformer.h:
            for field in LAYER_FIELDS:
                module_name, _, attr = field.rpartition(".")
                self.weights.append(getattr(block.get_submodule(module_name), attr))
        ln_f = model.transformer.ln_f
        self.final = (ln_f.weight, ln_f.bias, model.lm_head.weight[: model.config.vocab_size])
        self._layers: ctypes.Array | None = None
        self._cache: KVCache | None = None

    @classmethod
    def of(cls, model: GPT) -> CPUDecoder | None:
        """A decoder for `model` if it is an fp32 CPU model prepared by `use_cpu_linear` with the kernel."""
        linears = [m for m in model.modules() if isinstance(m, (nn.Linear, CPULinear))]
        norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
        usable = (
            model.device.type == "cpu"
            and model.dtype == torch.float32
            and type(model.transformer.wte) is nn.Embedding
            and len(linears) == 4 * model.config.n_layer + 1
            and all(type(m) is CPULinear and m.kernel is not None for m in linears)
            and all(m.weight.dtype == torch.float32 and m.weight.is_contiguous() for m in linears + norms)
        )
        return cls(model, linears[0].kernel) if usable else None

    def _layer_pointers(self, cache: KVCache) -> ctypes.Array:
        """The weights' and this cache's addresses, layer by layer (made once per cache)."""
        if self._cache is not cache:
            addresses: list[int | None] = []
            n = len(LAYER_FIELDS)
            for i in range(self.model.config.n_layer):
                addresses += [pointer(t) for t in self.weights[i * n : (i + 1) * n]]
                addresses += [pointer(cache.k[i]), pointer(cache.v[i])]
            self._layers = (ctypes.c_void_p * len(addresses))(*addresses)
            self._cache = cache
        return self._layers

    @torch.inference_mode()
    def step(self, ids: Tensor, cache: KVCache) -> Tensor:
        """Feed `ids` (B,), one token per sequence, after the cached positions; logits (B, vocab_size)."""
        model, c = self.model, self.model.config
        B = ids.size(0)
        pos = model.check_length(B, 1, cache)
        positions = torch.full((B,), pos, dtype=torch.long)
        pad = cache.pad
        if pad is not None:  # count from each sequence's first real token, as GPT.forward does
            positions = (positions - pad).clamp(min=0)
            pad = pad.to(torch.long).contiguous()
        x = (model.transformer.wte(ids) + model.transformer.wpe(positions)).contiguous()
        logits = torch.empty(B, c.vocab_size)
        ln_w, ln_b, head = self.final
        status = self.lib.gptkit_decode(
            x.data_ptr(),
            self._layer_pointers(cache),
            c.n_layer,
            B,
            c.n_embd,
            c.n_head,
            cache.max_len,
            pos,
            None if pad is None else pad.data_ptr(),
            pointer(ln_w),
            pointer(ln_b),
            pointer(head),
            c.vocab_size,
            logits.data_ptr(),
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("gptkit_decode could not allocate its scratch memory")
        cache.advance(1)
        return logits
