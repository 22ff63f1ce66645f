"""int4 through gptkit's CPU kernel: the packed layout, the products, and whole decoding steps.

The reference is plain arithmetic on the weights the int4 codes stand for (`dequantize`, bit for bit
what the kernel looks up) and on the activations as the kernel sees them: quantised to int8 per 64
inputs (`quantize_activations`) where it has AVX512-VNNI, else fp32. The kernel may only differ in
the order of its sums; separately, its int8 activations stay within their rounding of fp32's products.
"""

from __future__ import annotations

import platform
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptkit.config import ModelConfig
from gptkit.errors import GptkitError
from gptkit.generate import Sampler, SampleSettings
from gptkit.generate.cpu import int4
from gptkit.generate.cpu.build import (
    FLAGS,
    SOURCE,
    agrees,
    compile_library,
    int4_activation_block,
    kernel,
    matvec,
    open_library,
)
from gptkit.generate.cpu.decode import CPUDecoder
from gptkit.generate.cpu.linear import KERNEL_MAX_ROWS
from gptkit.generate.cpu.quantize import INT4_GROUP, INT4_KERNEL_ROWS, Int4Linear, Int8Linear, quantize
from gptkit.generate.decoder import ForwardDecoder, forward_decoder
from gptkit.generate.inference import fastest_decoder
from gptkit.model import GPT
from gptkit.tokenizer import CharTokenizer

needs_kernel = pytest.mark.skipif(kernel() is None, reason="gptkit's CPU kernels could not be built here")


def as_the_kernel_sees(x: torch.Tensor, lib=None) -> torch.Tensor:
    """x (..., n) as `lib`'s (default: this machine's) int4 products take it: int8 per block, or fp32."""
    block = int4_activation_block(lib or kernel())
    flat = x.reshape(-1, x.size(-1))
    return (int4.quantize_activations(flat, block) if block else flat).view_as(x)


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, lib=None) -> torch.Tensor:
    """What the int4 products compute, in float64: the activations as the kernel sees them, times w."""
    b = None if bias is None else bias.double()
    return F.linear(as_the_kernel_sees(x, lib).double(), w.double(), b).float()


def test_the_block_size_is_the_c_one() -> None:
    assert re.search(r"#define INT4_BLOCK (\d+)", SOURCE.read_text()).group(1) == str(int4.INT4_BLOCK)


@pytest.mark.parametrize(("n", "group"), [(64, 32), (768, 64), (37, 32), (75, 64), (1, 32), (200, 128)])
def test_every_weight_within_half_a_scale(n: int, group: int) -> None:
    """Any width packs (rows padded to whole blocks, a last partial group quantised over its own
    weights); each weight comes back within half its group's scale, min and max nearly exactly."""
    w = torch.randn(13, n, generator=torch.Generator().manual_seed(n)) * 0.05 + 0.01
    codes, scales = int4.pack(w, group)
    groups = -(-n // group)
    assert codes.dtype == torch.uint8 and codes.shape == (13, 16 * -(-n // 32))
    assert scales.dtype == torch.bfloat16 and scales.shape == (13, groups, 2)
    back = int4.dequantize(codes, scales, n, group)
    scale = scales[..., 0].float().repeat_interleave(group, dim=1)[:, :n]
    assert ((back - w).abs() <= scale / 2 * 1.0001).all()
    span = w.amax(1) - w.amin(1)
    assert ((back.amin(1) - w.amin(1)).abs() <= span / 100 + 1e-6).all()
    assert ((back.amax(1) - w.amax(1)).abs() <= span / 100 + 1e-6).all()


def test_the_codes_are_laid_out_as_documented() -> None:
    """Byte j of a block holds weight j (low 4 bits) and weight j + 16 (high): codes 0..15, then 15..0."""
    row = torch.cat([torch.arange(16.0), torch.arange(15.0, -1, -1)])[None]  # scale 1, zero 0
    codes, scales = int4.pack(row, 32)
    assert scales.float().tolist() == [[[1.0, 0.0]]]
    assert codes[0].tolist() == [j | (15 - j) << 4 for j in range(16)]


@pytest.mark.parametrize("group", [0, 16, 48, 100])
def test_group_sizes_the_kernel_cannot_take_are_refused(group: int) -> None:
    with pytest.raises(GptkitError, match=f"power of two of at least 32, not {group}"):
        int4.pack(torch.randn(4, 64), group)
    with pytest.raises(GptkitError, match="power of two"):
        Int4Linear(torch.randn(4, 64), None, group=group)


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 13])
@pytest.mark.parametrize(("n", "out", "group"), [(768, 2304, 64), (3072, 768, 32), (37, 13, 32), (75, 9, 64)])
def test_kernel_products_equal_the_dequantised_reference(m: int, n: int, out: int, group: int) -> None:
    g = torch.Generator().manual_seed(m + n + out)
    x, w, b = torch.randn(m, n, generator=g), torch.randn(out, n, generator=g), torch.randn(out, generator=g)
    codes, scales = int4.pack(w, group)
    ref = int4.dequantize(codes, scales, n, group)
    for bias in (b, None):
        got = matvec(kernel(), x, codes, bias, scales, group)
        torch.testing.assert_close(got, reference(x, ref, bias), rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize(
    ("m", "n", "group"), [(1, 768, 64), (4, 3072, 64), (3, 75, 32), (2, 200, 128), (5, 37, 32)]
)
def test_int8_activations_stay_within_their_rounding_of_fp32(m: int, n: int, group: int) -> None:
    """Against fp32 activations: each input is off by at most half its block's step (largest / 127),
    so a product by at most sum(|w_i| * largest_i / 254), plus fp32 rounding; large activations
    (outliers) in some blocks only widen their own blocks' steps."""
    block = int4_activation_block(kernel())
    if not block:
        pytest.skip("this machine's int4 products keep the activations in fp32")
    g = torch.Generator().manual_seed(n)
    x, w = torch.randn(m, n, generator=g), torch.randn(40, n, generator=g)
    x[:, ::50] *= 20
    codes, scales = int4.pack(w, group)
    w4 = int4.dequantize(codes, scales, n, group)
    got = matvec(kernel(), x, codes, None, scales, group)
    blocks = -(-n // block)
    largest = F.pad(x.abs(), (0, blocks * block - n)).view(m, blocks, block).amax(-1)
    half_step = (largest / 254).repeat_interleave(block, dim=1)[:, :n]
    bound = F.linear(half_step.double(), w4.abs().double())
    err = (got.double() - F.linear(x.double(), w4.double())).abs()
    assert (err <= bound * 1.0001 + 1e-4).all()
    assert (err > 1e-4).any()  # the activations were quantised: this bound, not the one above, holds


@needs_kernel
@pytest.mark.parametrize("kind", ["int4", "int8", "fp32"])
def test_a_row_gets_the_same_numbers_whatever_the_batch(kind: str) -> None:
    """Each row of x is summed in the same order alone or among others (in a tile of rows or the
    last, shorter one), for every kind of weights: a sequence decodes the same tokens whether or
    not others share its steps."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 200, generator=g), torch.randn(11, 200, generator=g)
    if kind == "int4":
        weights = (*int4.pack(w, 64), 64)
    elif kind == "int8":
        weights = (
            torch.randint(-127, 128, (11, 200), generator=g, dtype=torch.int8),
            torch.rand(11, generator=g),
        )
    else:
        weights = (w,)

    def product(rows: torch.Tensor) -> torch.Tensor:
        codes, *scales = weights
        return matvec(kernel(), rows.contiguous(), codes, None, *scales)

    together, seven = product(x), product(x[:7])  # 16 rows: 4 whole tiles; 7: a shorter last one
    for i in range(16):
        alone = product(x[i : i + 1])[0]
        assert torch.equal(alone, together[i])
        assert i >= 7 or torch.equal(alone, seven[i])


@needs_kernel
def test_the_layer_takes_the_kernel_for_few_rows_and_f_linear_for_many() -> None:
    g = torch.Generator().manual_seed(1)
    layer = Int4Linear(torch.randn(96, 160, generator=g), torch.randn(96, generator=g))
    x = torch.randn(2, INT4_KERNEL_ROWS, 160, generator=g)  # twice the rows the kernel takes
    ref = F.linear(x, layer.dequantized_weight(), layer.bias)
    few = reference(x[:, :3], layer.dequantized_weight(), layer.bias)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x[:, :3]), few, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or shutil.which("cc") is None,
    reason="the portable builds are compiled for x86-64 with the machine's cc",
)
@pytest.mark.parametrize("march", ["x86-64-v4", "x86-64-v3", "x86-64"])
def test_the_avx2_and_portable_code_agree_too(tmp_path: Path, march: str) -> None:
    """kernels.c with AVX-512 but not VNNI (fp32 activations, the permute lookups), without AVX-512
    (AVX2's permutes and blends) and without any x86 vector extension (plain C lookups) computes the
    same products: fp32, int8 and int4, every remainder."""
    path = tmp_path / f"kernels-{march}.so"
    compile_library(path, [f"-march={march}" if f == "-march=native" else f for f in FLAGS])
    lib = open_library(path)
    assert int4_activation_block(lib) == 0
    assert agrees(lib)
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(5, 75, generator=g), torch.randn(9, 75, generator=g)
    codes, scales = int4.pack(w, 32)
    ref = F.linear(x, int4.dequantize(codes, scales, 75, 32))
    torch.testing.assert_close(matvec(lib, x, codes, None, scales, 32), ref, rtol=1e-5, atol=1e-4)


class KernelInputLinear(torch.nn.Linear):
    """The reference for an Int4Linear: its input as the kernel takes it where Int4Linear uses the
    kernel (up to INT4_KERNEL_ROWS rows), fp32 where it goes to F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernel() is not None and x.numel() // x.size(-1) <= INT4_KERNEL_ROWS:
            x = as_the_kernel_sees(x)
        return super().forward(x)


def model_pair(
    bias: bool = True, n_head: int = 4, n_embd: int = 64, group: int = INT4_GROUP
) -> tuple[GPT, GPT]:
    """An int4 model and its reference: a plain fp32 GPT holding the weights the int4 model stands for
    (int4 blocks and head, int8 token table; the reference's head untied to carry the int4 one), its
    int4 layers taking their inputs as the kernel does."""
    config = ModelConfig(n_layer=3, n_head=n_head, n_embd=n_embd, block_size=128, vocab_size=301, bias=bias)
    torch.manual_seed(0)
    plain = GPT(config).eval()
    with torch.no_grad():  # larger weights than GPT-2's init: peaked, varied distributions
        for name, p in plain.named_parameters():
            if name.endswith("bias"):  # not zero: a bias added wrongly or not at all would show
                p.normal_(0, 0.5)
            else:
                p.mul_(4)
    q = GPT(config).eval()
    q.load_state_dict(plain.state_dict())
    quantize(q, "int4", group=group)
    ref = GPT(config).eval()
    ref.load_state_dict(plain.state_dict())
    ref.lm_head = torch.nn.Linear(n_embd, config.vocab_size, bias=False)
    with torch.no_grad():
        for name, module in q.named_modules():
            if isinstance(module, Int4Linear):
                bias = module.bias is not None
                layer = KernelInputLinear(module.in_features, module.out_features, bias=bias)
                layer.weight.copy_(module.dequantized_weight())
                if bias:
                    layer.bias.copy_(module.bias)
                ref.set_submodule(name, layer)
        table = q.transformer.wte
        ref.transformer.wte.weight.copy_(table.qweight.float() * table.scale[:, None])
    return ref, q


def decode_both(ref: GPT, q: GPT, prompts: torch.Tensor, pad: torch.Tensor | None, steps: int):
    """Logits of each decoding step: GPT.forward on the reference, the kernel's whole step on q."""
    decoder = CPUDecoder.of(q, prompts.size(0))
    assert decoder is not None
    B = prompts.size(0)
    ref_cache, cache = ref.new_cache(B), q.new_cache(B)
    ref_cache.set_padding(pad)
    cache.set_padding(pad)
    g = torch.Generator().manual_seed(1)
    out = []
    with torch.inference_mode():
        ref(prompts, cache=ref_cache)
        q(prompts, cache=cache)
        for _ in range(steps):
            ids = torch.randint(0, ref.config.vocab_size, (B,), generator=g)
            out.append((ref(ids[:, None], cache=ref_cache)[:, -1], decoder.step(cache, ids)))
    return out


def assert_close_steps(steps) -> None:
    """Each step's logits within fp32 rounding of the reference's, relative to the largest. With int8
    activations, looser: where the kernel's and torch's fp32 sums put an activation on either side of
    a rounding boundary, it moves by a whole step (1/127 of its block's largest) and the caches carry
    that on to later steps (up to 2.4e-2 seen here; a wrong bias, zero or cache position is of order 1)."""
    bound = 5e-2 if int4_activation_block(kernel()) else 1e-5
    for i, (ref, got) in enumerate(steps):
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err < bound, f"step {i}: relative difference {err:.2e}"


@needs_kernel
@pytest.mark.parametrize("bias", [True, False])
def test_int4_decoder_equals_forward_with_the_dequantised_weights(bias: bool) -> None:
    """Several sequences, left padding, with and without biases; the prompts (8 rows) take the kernel too."""
    ref, q = model_pair(bias=bias)
    prompts = torch.randint(0, 301, (2, 4))
    assert_close_steps(decode_both(ref, q, prompts, torch.tensor([0, 1]), 50))
    ref, q = model_pair(bias=bias)
    prompts = torch.randint(0, 301, (3, 50))  # 150 rows: the prompt goes through F.linear
    assert prompts.numel() > INT4_KERNEL_ROWS
    assert_close_steps(decode_both(ref, q, prompts, torch.tensor([0, 5, 29]), 20))


@needs_kernel
@pytest.mark.parametrize(("n_head", "n_embd", "group"), [(3, 72, 64), (3, 75, 32), (5, 40, 128)])
def test_int4_decoder_with_widths_off_the_group_and_the_block(n_head: int, n_embd: int, group: int) -> None:
    """Widths that are not a multiple of the group (72 of 64), of a block (75: odd too) or that are
    smaller than one group (40 of 128): the codes are padded, the kernel reads the rest one by one."""
    ref, q = model_pair(n_head=n_head, n_embd=n_embd, group=group)
    assert {m.group for m in q.modules() if isinstance(m, Int4Linear)} == {group}
    assert_close_steps(decode_both(ref, q, torch.randint(0, 301, (2, 6)), torch.tensor([2, 0]), 30))


@needs_kernel
def test_greedy_decoding_through_the_kernel_equals_forward() -> None:
    """The sampler, as gptkit.load runs it (the kernel decodes), picks the tokens GPT.forward picks."""
    tokenizer = CharTokenizer.train(["".join(chr(c) for c in range(32, 332))])
    _, q = model_pair()
    assert tokenizer.vocab_size == q.config.vocab_size
    assert isinstance(fastest_decoder(q, 3), CPUDecoder)
    prompts = [tokenizer.encode(p) for p in ("Hello", "a", "int4 weights, two a byte")]
    settings = SampleSettings.of(max_new_tokens=60, temperature=0, stop_tokens=[])
    fast = Sampler(q, tokenizer, fastest_decoder).generate_ids(prompts, settings)
    plain = Sampler(q, tokenizer, forward_decoder).generate_ids(prompts, settings)
    assert fast == plain and [len(r) for r in fast] == [60, 60, 60]


@needs_kernel
def test_the_decoder_takes_int4_models_of_one_group_size() -> None:
    _, q = model_pair()
    assert CPUDecoder.of(q) is not None and CPUDecoder.of(q, batch_size=KERNEL_MAX_ROWS + 1) is None
    q.transformer.h[0].attn.c_attn = Int4Linear(q.transformer.h[0].attn.c_attn.dequantized_weight(), None, 32)
    assert CPUDecoder.of(q) is None  # one group size per step: GPT.forward decodes instead
    assert isinstance(fastest_decoder(q, 1), ForwardDecoder)
    mixed = model_pair()[1]
    mixed.lm_head = Int8Linear(mixed.lm_head.dequantized_weight(), None)
    assert CPUDecoder.of(mixed) is None
