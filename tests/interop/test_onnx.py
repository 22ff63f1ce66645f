"""ONNX export, judged by onnxruntime: logits at several shapes, and greedy decoding over its KV cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_gpt

ort = pytest.importorskip("onnxruntime", reason="needs the export extra: pip install -e .[export]")
onnx = pytest.importorskip("onnx", reason="needs the export extra: pip install -e .[export]")

from gptkit.config import ModelConfig  # noqa: E402
from gptkit.errors import GptkitError  # noqa: E402
from gptkit.generate.sampler import Sampler  # noqa: E402
from gptkit.generate.settings import SampleSettings  # noqa: E402
from gptkit.interop.onnx import export_onnx, with_past_path  # noqa: E402
from gptkit.model import GPT  # noqa: E402
from gptkit.tokenizer import CharTokenizer  # noqa: E402

VOCAB = 70  # not a multiple of 64: the model's embedding has padding rows the graph must cut


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[GPT, ort.InferenceSession, ort.InferenceSession]:
    """One export for the module (it takes a few seconds). bias=False: ONNX expresses it as it is."""
    model = tiny_gpt(VOCAB, n_head=4, n_embd=64, bias=False, random_vectors=True)
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    prefill, decode = export_onnx(model, out)
    assert decode == with_past_path(out) == out.with_name("model_with_past.onnx")
    for path in (prefill, decode):
        onnx.checker.check_model(str(path))
    return model, ort.InferenceSession(str(prefill)), ort.InferenceSession(str(decode))


def test_inputs_and_outputs_have_dynamic_batch_and_sequence_axes(exported: tuple) -> None:
    _, prefill, decode = exported
    ids = prefill.get_inputs()[0]
    assert ids.name == "input_ids" and all(isinstance(d, str) for d in ids.shape)  # symbolic, not fixed
    names = [i.name for i in decode.get_inputs()]
    assert names == ["input_ids"] + [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    past = decode.get_inputs()[1].shape
    assert isinstance(past[0], str) and past[1] == 4 and isinstance(past[2], str) and past[3] == 16
    assert [o.name for o in decode.get_outputs()] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")
    ]


@pytest.mark.parametrize(("batch", "length"), [(1, 7), (3, 29), (2, 64)])
def test_onnxruntime_logits_equal_ours(exported: tuple, batch: int, length: int) -> None:
    model, prefill, decode = exported
    torch.manual_seed(length)
    ids = torch.randint(0, VOCAB, (batch, length))
    with torch.no_grad():
        ours = model(ids).numpy()
    logits, *present = prefill.run(None, {"input_ids": ids.numpy()})
    assert logits.shape == (batch, length, VOCAB)
    assert np.abs(logits - ours).max() < 1e-4
    assert present[0].shape == (batch, 4, length, 16)
    # the decoding graph continues from the prefill's keys and values (several new tokens at once)
    if length + 3 <= 64:
        more = torch.randint(0, VOCAB, (batch, 3))
        feeds = {
            "input_ids": more.numpy(),
            **dict(zip([i.name for i in decode.get_inputs()[1:]], present, strict=True)),
        }
        logits2 = decode.run(None, feeds)[0]
        with torch.no_grad():
            full = model(torch.cat([ids, more], dim=1))[:, -3:].numpy()
        assert np.abs(logits2 - full).max() < 1e-4


def test_greedy_decoding_through_the_kv_cache_graph_equals_ours(exported: tuple) -> None:
    model, prefill, decode = exported
    tok = CharTokenizer("".join(chr(c) for c in range(ord(" "), ord(" ") + VOCAB - 1)))
    prompts = [
        tok.encode("HELLO, ONNX"),
        tok.encode("OTHER TEXT!"),
    ]  # equal lengths: the graph has no padding
    settings = SampleSettings(temperature=0, max_new_tokens=30, stop_tokens=[])
    ours = Sampler(model, tok).generate_ids(prompts, settings)

    past_names = [i.name for i in decode.get_inputs()[1:]]
    logits, *present = prefill.run(None, {"input_ids": np.array(prompts, dtype=np.int64)})
    generated: list[np.ndarray] = []
    for _ in range(30):
        nxt = logits[:, -1].argmax(-1)
        generated.append(nxt)
        logits, *present = decode.run(
            None, {"input_ids": nxt[:, None], **dict(zip(past_names, present, strict=True))}
        )
    theirs = np.stack(generated, axis=1).tolist()
    assert theirs == ours
    assert present[0].shape[2] == len(prompts[0]) + 30  # the cache grew one position per step


def test_existing_output_is_not_overwritten(tmp_path: Path) -> None:
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=VOCAB))
    (tmp_path / "m_with_past.onnx").write_text("precious")
    with pytest.raises(GptkitError, match="m_with_past.onnx' already exists; .* --force"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists() and (tmp_path / "m_with_past.onnx").read_text() == "precious"
    with pytest.raises(GptkitError, match="should end in .onnx"):
        export_onnx(model, tmp_path / "m.bin")


@pytest.mark.parametrize("tied", [True, False])
def test_a_llama_style_model_exports_too(tmp_path: Path, tied: bool) -> None:
    """RMSNorm, SwiGLU, RoPE (theta 5e5), GQA 4:2, no bias: onnxruntime's prefill logits and its
    decoding graph's, continued over the presents (2 kv heads), equal ours."""
    switches = dict(norm="rmsnorm", mlp="swiglu", position="rope", rope_theta=5e5, n_kv_head=2, bias=False)
    model = tiny_gpt(VOCAB, n_head=4, n_embd=64, random_vectors=True, tie_embeddings=tied, **switches)
    prefill, decode = export_onnx(model, tmp_path / "llama.onnx")
    prefill, decode = ort.InferenceSession(str(prefill)), ort.InferenceSession(str(decode))
    ids, more = torch.randint(0, VOCAB, (2, 11)), torch.randint(0, VOCAB, (2, 3))
    with torch.no_grad():
        full = model(torch.cat([ids, more], dim=1)).numpy()
    logits, *present = prefill.run(None, {"input_ids": ids.numpy()})
    assert np.abs(logits - full[:, :11]).max() < 1e-4
    assert present[0].shape == (2, 2, 11, 16)
    names = [i.name for i in decode.get_inputs()[1:]]
    logits2 = decode.run(None, {"input_ids": more.numpy(), **dict(zip(names, present, strict=True))})[0]
    assert np.abs(logits2 - full[:, 11:]).max() < 1e-4
