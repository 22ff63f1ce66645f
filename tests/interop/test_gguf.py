"""GGUF export, judged by the gguf package's own reader (and by llama.cpp where llama-cpp-python is)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="needs the export extra: pip install -e .[export]")

from conftest import shared_file, tiny_gpt  # noqa: E402

from gptkit.api import export_model  # noqa: E402
from gptkit.checkpoint import save_checkpoint  # noqa: E402
from gptkit.config import RunConfig  # noqa: E402
from gptkit.errors import GptkitError  # noqa: E402
from gptkit.generate.sampler import Sampler  # noqa: E402
from gptkit.generate.settings import SampleSettings  # noqa: E402
from gptkit.interop.gguf import export_gguf  # noqa: E402
from gptkit.model import GPT  # noqa: E402
from gptkit.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, gpt2_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40 + "".join(
    map(chr, range(32, 127))
)


def tiny(tokenizer: Tokenizer, *, bias: bool = True, n_embd: int = 64) -> GPT:
    return tiny_gpt(tokenizer.vocab_size, n_head=4, n_embd=n_embd, bias=bias, random_vectors=True)


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    tok = BPETokenizer.train(TEXT, 300)
    assert tok.vocab_size % 64 != 0  # the model's embedding has padding rows the file must not carry
    return tok


@pytest.fixture(scope="module")
def gpt2_file(tmp_path_factory: pytest.TempPathFactory) -> gguf.GGUFReader:
    """A model with the real 50257-id GPT-2 vocabulary, written once (reading 50k strings takes seconds)."""
    tok = gpt2_tokenizer()
    path = export_gguf(tiny(tok, n_embd=32), tok, tmp_path_factory.mktemp("gguf") / "m.gguf", type="q8_0")
    return gguf.GGUFReader(path)


def expected(model: GPT) -> dict[str, np.ndarray]:
    """Our weights under llama.cpp's gpt2 names, mapped here by hand (independently of the exporter)."""
    c = model.config
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    zeros = np.zeros
    out = {
        "token_embd.weight": sd["transformer.wte.weight"][: c.vocab_size],
        "position_embd.weight": sd["transformer.wpe.weight"],
        "output_norm.weight": sd["transformer.ln_f.weight"],
        "output_norm.bias": sd.get("transformer.ln_f.bias", zeros(c.n_embd)),
    }
    parts = dict(ln_1="attn_norm", ln_2="ffn_norm")
    parts |= {
        "attn.c_attn": "attn_qkv",
        "attn.c_proj": "attn_output",
        "mlp.c_fc": "ffn_up",
        "mlp.c_proj": "ffn_down",
    }
    for i in range(c.n_layer):
        for ours, theirs in parts.items():
            w = sd[f"transformer.h.{i}.{ours}.weight"]
            out[f"blk.{i}.{theirs}.weight"] = w
            out[f"blk.{i}.{theirs}.bias"] = sd.get(f"transformer.h.{i}.{ours}.bias", zeros(w.shape[0]))
    return out


def field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_every_tensor_reads_back_equal_or_within_the_formats_error(
    tmp_path: Path, bpe: BPETokenizer, kind: str
) -> None:
    model = tiny(bpe)
    path = export_gguf(model, bpe, tmp_path / "m.gguf", type=kind)
    reader = gguf.GGUFReader(path)
    ours = expected(model)
    assert {t.name for t in reader.tensors} == ours.keys()
    for t in reader.tensors:
        want = ours[t.name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        assert [int(d) for d in reversed(t.shape)] == list(want.shape)  # ggml lists dims innermost first
        if kind == "f32" or want.ndim == 1 or t.name == "position_embd.weight":
            assert t.tensor_type == Q.F32 and np.array_equal(got, want), t.name
        elif kind == "f16":
            assert t.tensor_type == Q.F16 and np.array_equal(got, want.astype(np.float16).astype(np.float32))
        else:  # q8_0: 32-value blocks, one scale each (max |x| / 127, stored in f16), values rounded
            assert t.tensor_type == Q.Q8_0, t.name
            blocks = want.reshape(-1, 32)
            bound = np.abs(blocks).max(axis=1, keepdims=True) / 127 * 0.6
            assert (np.abs(got.reshape(-1, 32) - blocks) <= bound + 1e-7).all(), t.name
    assert field(reader, "general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[kind]


def test_metadata_llama_cpp_needs_for_gpt2(gpt2_file: gguf.GGUFReader) -> None:
    reader = gpt2_file
    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "gpt2.context_length") == 64
    assert field(reader, "gpt2.embedding_length") == 32
    assert field(reader, "gpt2.feed_forward_length") == 128
    assert field(reader, "gpt2.block_count") == 2
    assert field(reader, "gpt2.attention.head_count") == 4
    assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 50257 == reader.tensors[0].shape[1]  # token_embd has exactly the real rows
    assert tokens[50256] == "<|endoftext|>" and tokens[198] == "Ċ" and tokens[220] == "Ġ"
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[50256] == 3 and set(types[:50256]) == {1}
    assert len(field(reader, "tokenizer.ggml.merges")) == 50000
    assert (
        field(reader, "tokenizer.ggml.bos_token_id") == field(reader, "tokenizer.ggml.eos_token_id") == 50256
    )


def test_gpt2_tokens_and_merges_equal_the_original_files(gpt2_file: gguf.GGUFReader) -> None:
    vocab = json.loads(shared_file("tokenizer/encoder.json").read_text(encoding="utf-8"))
    merges = shared_file("tokenizer/vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    reader = gpt2_file
    assert field(reader, "tokenizer.ggml.tokens") == sorted(vocab, key=vocab.__getitem__)
    assert field(reader, "tokenizer.ggml.merges") == merges


def test_bias_false_gets_zero_biases_and_bpe_merges(tmp_path: Path, bpe: BPETokenizer) -> None:
    model = tiny(bpe, bias=False)
    reader = gguf.GGUFReader(export_gguf(model, bpe, tmp_path / "m.gguf", type="f32"))
    biases = {t.name: t.data for t in reader.tensors if t.name.endswith(".bias")}
    assert len(biases) == 2 * 6 + 1 and all(not b.any() for b in biases.values())
    hf_merges = json.loads(bpe.describe()["hf_json"])["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [
        m if isinstance(m, str) else " ".join(m) for m in hf_merges
    ]
    assert field(reader, "tokenizer.ggml.tokens")[bpe.eot_id] == "<|endoftext|>"


def test_unsupported_tokenizer_and_existing_output_are_clear_errors(
    tmp_path: Path, bpe: BPETokenizer
) -> None:
    chars = CharTokenizer.train(TEXT)
    with pytest.raises(GptkitError, match="GGUF cannot express the char tokenizer"):
        export_gguf(tiny(chars), chars, tmp_path / "c.gguf")
    assert not (tmp_path / "c.gguf").exists()
    (tmp_path / "m.gguf").write_text("precious")
    with pytest.raises(GptkitError, match="already exists"):
        export_gguf(tiny(bpe), bpe, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_text() == "precious"
    with pytest.raises(GptkitError, match="f32, f16, q8_0"):
        export_gguf(tiny(bpe), bpe, tmp_path / "n.gguf", type="q4_0")


def test_export_from_a_checkpoint_through_the_api(tmp_path: Path, bpe: BPETokenizer) -> None:
    model = tiny(bpe)
    config = RunConfig(name="shakes", model=model.config).model_dump(mode="json")
    save_checkpoint(
        tmp_path / "m.pt", model_state=model.state_dict(), config=config, tokenizer=bpe.describe()
    )
    (path,) = export_model(tmp_path / "m.pt", "gguf", tmp_path / "m.gguf", type="q8_0")
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.name") == "shakes" and field(reader, "general.file_type") == 7


def test_llama_cpp_greedy_tokens_equal_ours(tmp_path: Path, bpe: BPETokenizer) -> None:
    llama_cpp = pytest.importorskip(
        "llama_cpp",
        reason="llama-cpp-python is not installed (PyPI has no CPU wheel: it builds llama.cpp from source, "
        "about 6 minutes); pip install -e '.[llama]' to run this test",
    )
    model = tiny(bpe)
    path = export_gguf(model, bpe, tmp_path / "m.gguf", type="f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False)
    prompt = "First Citizen:\nBefore we"
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
    assert ids == bpe.encode(prompt)
    theirs: list[int] = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == 20:
            break
    settings = SampleSettings(temperature=0, max_new_tokens=20, stop_tokens=[])
    assert theirs == Sampler(model, bpe).generate_ids([ids], settings)[0]
