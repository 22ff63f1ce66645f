"""A whole decoding step of a GPT on the CPU in one call of gptkit's kernel (`gptkit_decode`).

Decoding one token runs about 30 small PyTorch operations per layer between the matrix-vector
products, and each runs with the caches that the streaming weights have just flushed: for GPT-2
124M on this project's CPU about 4 ms of an 18 ms step. `gptkit_decode` in `kernels.c` does
the step's arithmetic (LayerNorms, products, attention over the key/value cache, GELU, residuals,
the head) in one OpenMP region, with the same weights and the same `KVCache`, so the step costs
little more than streaming the weights. `GPT.forward` stays the reference: the tests hold the two
to fp32 rounding, with left padding, several sequences, and models without biases.

`CPUDecoder.of` serves models that `gptkit.generate.cpu.linear.use_cpu_linear` prepared (what
`gptkit.load` does for fp32 models on the CPU) and quantised ones (`Int8Linear`: int8 weights with
row scales; `Int4Linear`: 4-bit weights with group scales; fp32 activations for both) when the
kernel is built; everything else (GPUs, bf16, LoRA layers not merged, and models with a switch the
kernel does not compute: RMSNorm, SwiGLU, RoPE, grouped-query attention, a norm_eps other than
GPT-2's; see `kernel_misfits`) decodes through `GPT.forward` (`gptkit.generate.inference` chooses).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from gptkit.config import ModelConfig
from gptkit.generate.cpu.build import pointer
from gptkit.generate.cpu.linear import KERNEL_MAX_ROWS, CPULinear
from gptkit.generate.cpu.quantize import INT8_KERNEL_ROWS, Int4Linear, Int8Linear
from gptkit.model import GPT, LAYER_NORM_EPS, KVCache

# The pointers gptkit_decode reads per layer, in order: (C name prefix, submodule, its tensors), where
# W is a weight, B a bias and S an int8 matrix's row scales or an int4 one's group (scale, zero)
# pairs (NULL for fp32); the layer's cached keys and values follow. kernels.c's enum names the same
# pointers; a test holds the two equal.
NORM, LINEAR = ("W", "B"), ("W", "S", "B")
LAYER_POINTERS = (
    ("LN1", "ln_1", NORM),
    ("ATTN", "attn.c_attn", LINEAR),
    ("ATTN_PROJ", "attn.c_proj", LINEAR),
    ("LN2", "ln_2", NORM),
    ("FC", "mlp.c_fc", LINEAR),
    ("MLP_PROJ", "mlp.c_proj", LINEAR),
)
CACHE_POINTERS = ("K_CACHE", "V_CACHE")
LINEAR_LAYERS = (nn.Linear, CPULinear, Int8Linear, Int4Linear)  # the kinds a GPT's matrices may be
# sequences up to which a whole step through the kernel is the faster way, by the kind of weights
MAX_ROWS = {CPULinear: KERNEL_MAX_ROWS, Int8Linear: INT8_KERNEL_ROWS, Int4Linear: KERNEL_MAX_ROWS}


# The architecture the C step computes: GPT-2's (any shape, with or without biases, tied or not).
KERNEL_ARCHITECTURE = {"norm": "layernorm", "norm_eps": LAYER_NORM_EPS, "mlp": "gelu", "position": "learned"}


def kernel_misfits(config: ModelConfig) -> list[str]:
    """The model's switches the kernel does not compute ("position rope", ...); empty: it serves."""
    wanted = KERNEL_ARCHITECTURE | {"kv_heads": config.n_head}
    return [f"{key} {getattr(config, key)}" for key, value in wanted.items() if getattr(config, key) != value]


def layer_pointer_names() -> list[str]:
    """The C names of one layer's pointers, in the order `CPUDecoder` passes them."""
    return [f"{prefix}_{f}" for prefix, _, fields in LAYER_POINTERS for f in fields] + list(CACHE_POINTERS)


def _tensors(module: nn.Module, fields: tuple[str, ...]) -> list[Tensor | None]:
    """The module's tensors named by `fields` (W, S, B): a LayerNorm, an Int8Linear, an Int4Linear or a
    CPULinear."""
    if isinstance(module, nn.LayerNorm):
        named = {"W": module.weight, "B": module.bias}
    elif isinstance(module, Int8Linear):
        named = {"W": module.qweight, "S": module.scale, "B": module.bias}
    elif isinstance(module, Int4Linear):
        named = {"W": module.codes, "S": module.scales, "B": module.bias}
    else:  # a CPULinear
        named = {"W": module.matrix, "S": None, "B": module.bias}
    return [named[f] for f in fields]


class CPUDecoder:
    """`step(cache, ids)`: the logits after one new token per sequence, like `GPT.forward` with a cache."""

    def __init__(self, model: GPT, lib: ctypes.CDLL) -> None:
        self.model, self.lib = model, lib
        # kept referenced: the kernel holds their addresses
        self.layers = [
            [t for _, name, fields in LAYER_POINTERS for t in _tensors(block.get_submodule(name), fields)]
            for block in model.transformer.h
        ]
        self.final = _tensors(model.transformer.ln_f, NORM) + _tensors(model.lm_head, ("W", "S"))
        self.hidden = _tensors(model.transformer.h[0].mlp.c_fc, ("W",))[0].size(0)  # the MLP's width
        self.group = getattr(model.lm_head, "group", 0)  # int4's, the same for every matrix; else 0
        self._pointers: ctypes.Array | None = None
        self._cache: KVCache | None = None

    @classmethod
    def of(cls, model: GPT, batch_size: int = 1) -> CPUDecoder | None:
        """A decoder for `model` if it is a CPU model of GPT-2's architecture prepared by
        `use_cpu_linear` (fp32) or quantised (`gptkit.generate.cpu.quantize`), and gptkit's kernels
        are built. Not for more sequences than MAX_ROWS gives the kind of weights: there the
        products through GPT.forward are faster, although the kernel reads each weight once for all
        rows (GPT-2 124M, 2 threads, `bench/decode_rows.py`, medians: fp32 16 sequences 52 ms
        against oneDNN's 71; int8 8 sequences 24 against `torch._int_mm`'s 32, 12 sequences 35
        against 32)."""
        linears = [m for m in model.modules() if isinstance(m, LINEAR_LAYERS)]
        kinds = {type(m) for m in linears}
        groups = {getattr(m, "group", 0) for m in linears}
        usable = (
            not kernel_misfits(model.config)
            and model.device.type == "cpu"
            and model.dtype == torch.float32
            and len(linears) == sum(f == LINEAR for *_, f in LAYER_POINTERS) * model.config.n_layer + 1
            and kinds in ({Int8Linear}, {Int4Linear}, {CPULinear})
            and len(groups) == 1  # the kernel takes one int4 group size for all matrices
            and all(m.kernel is not None for m in linears)  # built when the layers were made
        )
        return cls(model, linears[0].kernel) if usable and batch_size <= MAX_ROWS[next(iter(kinds))] else None

    def _layer_pointers(self, cache: KVCache) -> ctypes.Array:
        """The weights' and this cache's addresses, layer by layer (made once per cache)."""
        if self._cache is not cache:
            addresses: list[int | None] = []
            for i, tensors in enumerate(self.layers):
                addresses += [pointer(t) for t in tensors] + [pointer(cache.k[i]), pointer(cache.v[i])]
            self._pointers = (ctypes.c_void_p * len(addresses))(*addresses)
            self._cache = cache
        return self._pointers

    @torch.inference_mode()
    def step(self, cache: KVCache, ids: Tensor) -> Tensor:
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
        ln_w, ln_b, head, head_scale = self.final
        status = self.lib.gptkit_decode(
            x.data_ptr(),
            self._layer_pointers(cache),
            c.n_layer,
            self.group,
            B,
            c.n_embd,
            self.hidden,
            c.n_head,
            cache.max_len,
            pos,
            None if pad is None else pad.data_ptr(),
            pointer(ln_w),
            pointer(ln_b),
            pointer(head),
            pointer(head_scale),
            c.vocab_size,
            logits.data_ptr(),
            LAYER_NORM_EPS,
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("gptkit_decode could not allocate its scratch memory")
        cache.advance(1)
        return logits
