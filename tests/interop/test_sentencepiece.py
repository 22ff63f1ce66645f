"""A SentencePiece-style tokenizer (Llama's tokenizer.json: "▁" for spaces, byte fallback, "</s>") as a
gptkit tokenizer: the ids of HF's own tokenizer, decoding byte for byte, and a Llama imported with it
samples the tokens transformers generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency")
pytest.importorskip("safetensors.torch", reason="needs the export extra: pip install -e .[export]")

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers  # noqa: E402

from gptkit.generate.sampler import Sampler  # noqa: E402
from gptkit.generate.settings import SampleSettings  # noqa: E402
from gptkit.interop.hf import load_hf  # noqa: E402
from gptkit.tokenizer import SentencePieceTokenizer, from_description  # noqa: E402

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n" * 30
SAMPLES = ["Before we speak, hear me.", "  two spaces\tand a tab\n", "naïve café — 日本 🙂", "</s> is text"]


def llama_style_tokenizer(folder: Path) -> Path:
    """Llama's tokenizer.json layout, trained here: BPE with byte fallback and the 256 byte pieces,
    normalizer Prepend("▁") + Replace(" ", "▁"), decoder Replace + ByteFallback + Fuse + Strip."""
    hf = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False)
    hf.train_from_iterator([TEXT], trainer=trainer)
    hf.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "LlamaTokenizerFast", "eos_token": "</s>", "bos_token": "<s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_ids_are_hfs_and_bytes_round_trip(tmp_path: Path) -> None:
    folder = llama_style_tokenizer(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    ours = SentencePieceTokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")), "</s>")
    assert ours.eot_id == hf.convert_tokens_to_ids("</s>")
    for text in SAMPLES:
        ids = ours.encode(text)
        if "</s>" not in text:  # HF's wrapper splits special tokens out of text; gptkit keeps them text
            assert ids == hf.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == " " + text  # the space encoding put before the first word
    assert ours.encode("</s>") != [ours.eot_id]
    assert ours.decode_bytes(ours.encode("🙂"))[:3] == " 🙂".encode()[:3]  # a stream can stop mid-character
    again = from_description(json.loads(json.dumps(ours.describe())))
    assert again.encode(SAMPLES[2]) == ours.encode(SAMPLES[2]) and again.fingerprint() == ours.fingerprint()


def test_a_llama_with_it_samples_what_transformers_generates(tmp_path: Path) -> None:
    folder = llama_style_tokenizer(tmp_path / "hf")
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=2, bos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.1) if p.dim() > 1 else p.normal_(1.0, 0.2)
    theirs.save_pretrained(folder)
    model, tokenizer, _ = load_hf(folder)
    assert isinstance(tokenizer, SentencePieceTokenizer) and tokenizer.eot_id == 2
    prompt = tokenizer.encode("Before we")
    with torch.no_grad():
        want = (
            theirs.eval()
            .generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=20, eos_token_id=None, pad_token_id=0
            )[0, len(prompt) :]
            .tolist()
        )
    settings = SampleSettings(temperature=0, max_new_tokens=20, stop_tokens=[])
    got = Sampler(model, tokenizer).generate_ids([prompt], settings)[0]
    assert got == want  # (the random model's text is random bytes: decoding is tested above)
