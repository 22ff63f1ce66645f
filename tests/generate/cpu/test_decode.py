"""gptkit's CPU kernels: the whole-step decoder and the products agree with GPT.forward and F.linear."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptkit.config import ModelConfig
from gptkit.finetuning.prompt_tuning import add_soft_prompt
from gptkit.generate.cpu.build import kernel, matvec
from gptkit.generate.cpu.decode import CPUDecoder
from gptkit.generate.cpu.linear import KERNEL_MAX_ROWS, use_cpu_linear
from gptkit.generate.cpu.quantize import INT8_KERNEL_ROWS, Int8Linear, quantize
from gptkit.generate.decoder import ForwardDecoder
from gptkit.generate.inference import fastest_decoder
from gptkit.model import GPT

pytestmark = pytest.mark.skipif(kernel() is None, reason="gptkit's CPU kernels could not be built here")


def pair(bias: bool = True, n_head: int = 4, n_embd: int = 64, soft_prompt: int = 0) -> tuple[GPT, GPT]:
    """A plain model and its copy prepared for CPU inference (what gptkit.load does)."""
    config = ModelConfig(n_layer=3, n_head=n_head, n_embd=n_embd, block_size=128, vocab_size=301, bias=bias)
    torch.manual_seed(0)
    plain = GPT(config).eval()
    with torch.no_grad():  # larger weights than GPT-2's init: peaked, varied distributions
        for p in plain.parameters():
            p.mul_(4)
        if bias:  # zero-initialised biases would hide a bias that is added wrongly or not at all
            for name, p in plain.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    if soft_prompt:
        plain = add_soft_prompt(plain, soft_prompt)
        with torch.no_grad():
            plain.soft_prompt.normal_()
    fast = GPT(config).eval()
    if soft_prompt:
        fast = add_soft_prompt(fast, soft_prompt)
    fast.load_state_dict(plain.state_dict())
    use_cpu_linear(fast)
    return plain, fast


def decode_both(plain: GPT, fast: GPT, prompts: torch.Tensor, pad: torch.Tensor | None, steps: int):
    """Logits of each decoding step by GPT.forward and by the decoder, fed the same tokens."""
    decoder = CPUDecoder.of(fast)
    assert decoder is not None
    B = prompts.size(0)
    n_prompt = plain.n_prefix
    ref_cache, cache = plain.new_cache(B), fast.new_cache(B)
    ref_cache.set_padding(pad)
    cache.set_padding(pad)
    g = torch.Generator().manual_seed(1)
    out = []
    with torch.inference_mode():
        plain(prompts, cache=ref_cache)
        fast(prompts, cache=cache)
        for _ in range(steps - n_prompt):
            ids = torch.randint(0, plain.config.vocab_size, (B,), generator=g)
            ref = plain(ids[:, None], cache=ref_cache)[:, -1]
            out.append((ref, decoder.step(cache, ids)))
    assert cache.pos == ref_cache.pos
    return out


def assert_close_steps(steps) -> None:
    for i, (ref, got) in enumerate(steps):
        assert got.shape == ref.shape
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err < 1e-5, f"step {i}: relative difference {err:.2e}"


def test_decoder_equals_forward_for_100_steps() -> None:
    plain, fast = pair()
    prompts = torch.randint(0, 301, (1, 7))
    assert_close_steps(decode_both(plain, fast, prompts, None, 100))


@pytest.mark.parametrize(("bias", "n_head"), [(True, 4), (False, 4), (True, 1)])
def test_decoder_with_left_padding_and_several_sequences(bias: bool, n_head: int) -> None:
    """Heads of 16 values (one vector each) and of 64 (GPT-2's: four), unevenly padded sequences."""
    plain, fast = pair(bias=bias, n_head=n_head)
    prompts = torch.randint(0, 301, (3, 12))
    pad = torch.tensor([0, 5, 11])  # the last sequence has a single real token
    assert_close_steps(decode_both(plain, fast, prompts, pad, 40))


def test_decoder_after_a_soft_prompt_and_with_odd_head_sizes() -> None:
    plain, fast = pair(n_head=3, n_embd=72, soft_prompt=5)  # head_dim 24: not a multiple of 16
    prompts = torch.randint(0, 301, (2, 6))
    assert_close_steps(decode_both(plain, fast, prompts, torch.tensor([2, 0]), 30))


def test_decoder_reads_the_mlp_width_from_the_model() -> None:
    """The kernel takes the MLP's width from the layers (not 4 x n_embd), as GPT.forward does."""
    plain, _ = pair()
    torch.manual_seed(2)
    for block in plain.transformer.h:  # width 96 instead of 256
        block.mlp.c_fc = torch.nn.Linear(64, 96)
        block.mlp.c_proj = torch.nn.Linear(96, 64)
    fast = copy.deepcopy(plain)
    use_cpu_linear(fast)
    prompts = torch.randint(0, 301, (2, 5))
    assert_close_steps(decode_both(plain, fast, prompts, torch.tensor([0, 2]), 20))


def test_int8_decoder_equals_forward_with_the_dequantised_weights() -> None:
    """int8 weights with row scales and fp32 activations: exactly a model with the weights int8 stands for."""
    plain, _ = pair()
    q = GPT(plain.config).eval()
    q.load_state_dict(plain.state_dict())
    quantize(q, "int8")
    ref = GPT(plain.config).eval()
    ref.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for name, module in q.named_modules():
            if isinstance(module, Int8Linear) and name != "lm_head":
                ref.get_submodule(name).weight.copy_(module.dequantized_weight())
        table = q.transformer.wte
        ref.transformer.wte.weight.copy_(table.qweight.float() * table.scale[:, None])  # the head: tied
        assert torch.equal(q.lm_head.dequantized_weight(), ref.lm_head.weight[: plain.config.vocab_size])
    prompts = torch.randint(0, 301, (2, 2))  # 4 rows: the prompt goes through the kernel too
    assert_close_steps(decode_both(ref, q, prompts, torch.tensor([0, 1]), 50))


def test_decoder_results_do_not_depend_on_the_number_of_threads() -> None:
    _, fast = pair()
    decoder = CPUDecoder.of(fast)
    before = torch.get_num_threads()
    logits = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        cache = fast.new_cache(2)
        with torch.inference_mode():
            fast(torch.randint(0, 301, (2, 9), generator=torch.Generator().manual_seed(0)), cache=cache)
            logits.append(decoder.step(cache, torch.tensor([3, 4])))
    torch.set_num_threads(before)
    assert torch.equal(logits[0], logits[1])


def test_decoder_only_for_prepared_fp32_and_quantised_cpu_models() -> None:
    plain, fast = pair()
    top = KERNEL_MAX_ROWS  # bench/decode_rows.py's measurements
    assert CPUDecoder.of(fast) is not None and CPUDecoder.of(fast, batch_size=top) is not None
    assert CPUDecoder.of(fast, batch_size=top + 1) is None  # many sequences: oneDNN through GPT.forward
    assert CPUDecoder.of(plain) is None  # not prepared: GPT.forward decodes
    onednn_only = GPT(plain.config).eval()
    use_cpu_linear(onednn_only, use_kernel=False)
    assert CPUDecoder.of(onednn_only) is None
    for mode in ("int8", "int4"):
        quantised = GPT(plain.config).eval()
        quantize(quantised, mode)
        assert CPUDecoder.of(quantised) is not None
        assert isinstance(fastest_decoder(quantised, 1), CPUDecoder)
    # int8: torch._int_mm's products are faster for many sequences (int8 x int8); int4 has no such way
    assert CPUDecoder.of(quantised, batch_size=top) is not None  # the int4 one
    int8 = GPT(plain.config).eval()
    quantize(int8, "int8")
    int8_top = INT8_KERNEL_ROWS
    assert (
        CPUDecoder.of(int8, batch_size=int8_top) is not None
        and CPUDecoder.of(int8, batch_size=int8_top + 1) is None
    )
    # what TextModel's sampler gets: the kernel exactly where CPUDecoder.of serves, else GPT.forward
    assert isinstance(fastest_decoder(fast, top), CPUDecoder)
    assert isinstance(fastest_decoder(fast, top + 1), ForwardDecoder)
    assert isinstance(fastest_decoder(plain, 1), ForwardDecoder)


@pytest.mark.parametrize("m", [1, 2, 5, 8, 13, 16])
@pytest.mark.parametrize(("n", "out"), [(768, 2304), (37, 13), (64, 9), (3072, 768)])
def test_products_equal_f_linear(m: int, n: int, out: int) -> None:
    g = torch.Generator().manual_seed(m + n + out)
    x, w, b = torch.randn(m, n, generator=g), torch.randn(out, n, generator=g), torch.randn(out, generator=g)
    torch.testing.assert_close(matvec(kernel(), x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(matvec(kernel(), x, w, None), F.linear(x, w), rtol=1e-5, atol=1e-4)
    q = torch.randint(-127, 128, (out, n), generator=g, dtype=torch.int8)
    scale = torch.rand(out, generator=g) / 100
    expected = F.linear(x, q.float() * scale[:, None], b)
    torch.testing.assert_close(matvec(kernel(), x, q, b, scale), expected, rtol=1e-5, atol=1e-4)


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )


def test_kernels_build_into_the_cache_folder_only_when_needed(tmp_path: Path) -> None:
    """A plain model (the trainer's samples, under bf16 autocast) never builds them; the first
    prepared model does, into the cache folder, autocast or not."""
    code = (
        "import torch\n"
        "from gptkit.config import ModelConfig\n"
        "from gptkit.generate.cpu.decode import CPUDecoder\n"
        "from gptkit.generate.cpu.linear import use_cpu_linear\n"
        "from gptkit.model import GPT\n"
        "m = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50)).eval()\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    assert CPUDecoder.of(m) is None\n"
        "    import os; assert not os.path.exists(os.path.join(os.environ['GPTKIT_CACHE'], 'kernels'))\n"
        "    use_cpu_linear(m)\n"
        "    assert CPUDecoder.of(m) is not None\n"
    )
    done = run_python(code, {"GPTKIT_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("cpu_kernels-") and built[0].suffix == ".so"


def test_without_a_compiler_decoding_falls_back_to_onednn_with_a_notice(tmp_path: Path) -> None:
    code = (
        "import torch\n"
        "from gptkit.generate.cpu.decode import CPUDecoder\n"
        "from gptkit.generate.cpu.build import kernel\n"
        "from gptkit.generate.cpu.linear import use_cpu_linear\n"
        "from gptkit.model import GPT\n"
        "from gptkit.config import ModelConfig\n"
        "m = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50)).eval()\n"
        "plain = m(torch.tensor([[1, 2, 3]]))[0]\n"
        "assert kernel() is None and use_cpu_linear(m) == 5 and CPUDecoder.of(m) is None\n"
        "with torch.inference_mode():\n"
        "    torch.testing.assert_close(m(torch.tensor([[1, 2, 3]]))[0], plain)\n"
    )
    done = run_python(code, {"GPTKIT_CACHE": str(tmp_path), "CC": str(tmp_path / "no-such-compiler")})
    assert done.returncode == 0, done.stderr
    notices = [line for line in done.stderr.splitlines() if line.startswith("gptkit:")]
    assert len(notices) == 1 and "uses oneDNN" in notices[0] and "no-such-compiler" in notices[0], done.stderr
