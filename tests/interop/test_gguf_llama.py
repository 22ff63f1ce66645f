"""GGUF export of a Llama-style model for llama.cpp's `llama` architecture, judged by the gguf reader
and by llama.cpp itself (llama-cpp-python, when installed): q and k must be permuted for llama.cpp's
interleaved RoPE, so greedy tokens and logits prove the layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="needs the export extra: pip install -e .[export]")

from conftest import tiny_gpt  # noqa: E402

from gptkit.errors import GptkitError  # noqa: E402
from gptkit.generate.sampler import Sampler  # noqa: E402
from gptkit.generate.settings import SampleSettings  # noqa: E402
from gptkit.interop import gguf as gguf_export  # noqa: E402
from gptkit.interop.gguf import export_gguf  # noqa: E402
from gptkit.model import GPT  # noqa: E402
from gptkit.tokenizer import BPETokenizer  # noqa: E402

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40 + "".join(
    map(chr, range(32, 127))
)
LLAMA = dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, n_head=4, n_embd=64, norm_eps=1e-6)
SHAPES = {
    "gqa-untied": dict(n_kv_head=2, tie_embeddings=False, rope_theta=500000.0),
    "mha-tied": dict(n_kv_head=4, tie_embeddings=True, rope_theta=20000.0),
}


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(TEXT, 300)


def llama(tokenizer: BPETokenizer, **shape: object) -> GPT:
    """Random, with sharp attention (q and k x4): positions then matter, so a wrong RoPE layout moves
    the logits by ~0.07, where the right one stays within ~3e-4."""
    model = tiny_gpt(tokenizer.vocab_size, seed=3, scale=2.0, random_vectors=True, **{**LLAMA, **shape})
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(4)
    return model


def llama_cpp_logits(llama_cpp: object, path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)])


def field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_the_reader_sees_llamas_metadata_and_tensors(tmp_path: Path, bpe: BPETokenizer, shape: dict) -> None:
    model = llama(bpe, **shape)
    reader = gguf.GGUFReader(export_gguf(model, bpe, tmp_path / "m.gguf", type="f32"))
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.attention.head_count") == 4
    assert field(reader, "llama.attention.head_count_kv") == shape["n_kv_head"]
    assert field(reader, "llama.rope.freq_base") == pytest.approx(shape["rope_theta"])
    assert field(reader, "llama.rope.dimension_count") == 16
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert field(reader, "llama.feed_forward_length") == model.config.hidden
    names = {t.name: t for t in reader.tensors}
    assert ("output.weight" in names) is not shape["tie_embeddings"]
    assert "position_embd.weight" not in names
    v = names["blk.1.attn_v.weight"]
    want = model.transformer.h[1].attn.c_attn.weight[-16 * shape["n_kv_head"] :]
    np.testing.assert_array_equal(np.asarray(v.data).reshape(want.shape), want.detach().numpy())


def test_a_llama_with_biases_is_refused(tmp_path: Path, bpe: BPETokenizer) -> None:
    with pytest.raises(GptkitError, match="needs model.bias=false"):
        export_gguf(llama(bpe, **{**SHAPES["mha-tied"], "bias": True}), bpe, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_llama_cpp_gives_our_greedy_tokens_and_logits(
    tmp_path: Path, bpe: BPETokenizer, shape: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    llama_cpp = pytest.importorskip(
        "llama_cpp",
        reason="llama-cpp-python is not installed (it builds llama.cpp from source, about 6 minutes); "
        "pip install -e '.[llama]' to run this test",
    )
    model = llama(bpe, **shape)
    path = export_gguf(model, bpe, tmp_path / "m.gguf", type="f32")
    ids = bpe.encode("First Citizen:\nBefore we")
    with torch.no_grad():
        ours_logits = model(torch.tensor([ids]))[0].numpy()
    assert np.abs(llama_cpp_logits(llama_cpp, path, ids) - ours_logits).max() < 5e-3
    # the classic bug, made on purpose: q and k not permuted for llama.cpp's RoPE are caught
    monkeypatch.setattr(gguf_export, "rope_permuted", lambda weight, heads: weight)
    wrong = export_gguf(model, bpe, tmp_path / "wrong.gguf", type="f32")
    assert np.abs(llama_cpp_logits(llama_cpp, wrong, ids) - ours_logits).max() > 2e-2
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False)
    theirs: list[int] = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == 20:
            break
    settings = SampleSettings(temperature=0, max_new_tokens=20, stop_tokens=[])
    assert theirs == Sampler(model, bpe).generate_ids([ids], settings)[0]
