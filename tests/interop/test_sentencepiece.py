"""A SentencePiece-style tokenizer (Llama's tokenizer.json: "▁" for spaces, byte fallback, "</s>") as a
gptkit tokenizer: the ids of HF's own tokenizer, decoding byte for byte, a Llama imported with it
samples the tokens transformers generates, and `prepare --tokenizer model:PATH` makes data that the
imported model fine-tunes on."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from cli import gptkit_cli

transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency")
pytest.importorskip("safetensors.torch", reason="needs the export extra: pip install -e .[export]")

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers  # noqa: E402

from gptkit.checkpoint import load_checkpoint  # noqa: E402
from gptkit.checkpoint.run import step_file  # noqa: E402
from gptkit.data.shards import PreparedData  # noqa: E402
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


def random_llama(folder: Path) -> torch.nn.Module:
    """A random LlamaForCausalLM saved with the Llama-style tokenizer in `folder`, as a hub model is."""
    llama_style_tokenizer(folder)
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
    return theirs


def test_a_llama_with_it_samples_what_transformers_generates(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    theirs = random_llama(folder)
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


def gptkit(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return gptkit_cli(*args, env={**os.environ, "GPTKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"})


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gptkit: "), result.stderr
    return last


def test_prepare_with_an_imported_models_tokenizer_then_finetune_it(tmp_path: Path) -> None:
    """The CLI path of a user who imports a Llama from HF and fine-tunes it on their own text."""
    folder = tmp_path / "hf"
    random_llama(folder)
    ckpt = tmp_path / "llama.pt"
    assert gptkit("import", "hf", folder, ckpt).returncode == 0
    docs = [f"{i}: {SAMPLES[i % 3]} {i * i}" for i in range(60)]  # each gets its "▁", as in HF's encode
    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))

    prepared = {}
    for name, source in (("ckpt", ckpt), ("folder", folder)):
        out = tmp_path / f"data-{name}"
        done = gptkit("prepare", text, "--out", out, "--tokenizer", f"model:{source}", "--val-fraction", "0")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "tokenizer sentencepiece" in done.stderr
        prepared[name] = PreparedData.open(out)
    model_tokenizer = from_description(load_checkpoint(ckpt)["tokenizer"])
    for data in prepared.values():
        assert data.meta["tokenizer_fingerprint"] == model_tokenizer.fingerprint()
        assert data.meta["settings"]["tokenizer"].startswith("model:")
        ids = np.concatenate(data.shards("train")).tolist()
        eot = model_tokenizer.eot_id
        assert ids == [i for d in docs for i in [*hf.encode(d, add_special_tokens=False), eot]]
    assert (tmp_path / "data-ckpt" / "tokenizer.json").is_file()

    config = tmp_path / "cpt.yaml"
    config.write_text(f"finetune:\n  base: {ckpt}\n  method: lora\n  lora:\n    targets: [q_proj, v_proj]\n")
    common = [
        f"runs_dir={tmp_path / 'runs'}", "train.max_steps=2", "train.micro_batch_size=2",
        "train.precision=fp32", "train.warmup_steps=1", "eval.batches=1", "eval.sample_tokens=0",
        "checkpoint.every_steps=0", "checkpoint.every_minutes=0",
    ]  # fmt: skip
    tuned = gptkit("finetune", config, *common, "name=cpt", f"data.path={tmp_path / 'data-ckpt'}")
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert load_checkpoint(step_file(tmp_path / "runs" / "cpt", 2))["progress"]["step"] == 2

    other = gptkit(
        "prepare", text, "--out", tmp_path / "data-gpt2", "--tokenizer", "gpt2", "--val-fraction", "0"
    )
    assert other.returncode == 0, other.stderr[-3000:]
    wrong = gptkit("finetune", config, *common, "name=wrong", f"data.path={tmp_path / 'data-gpt2'}")
    assert "different tokenizer (gpt2) than base model" in one_line_error(wrong)

    missing = gptkit(
        "prepare", text, "--out", tmp_path / "nothing", "--tokenizer", f"model:{tmp_path / 'no'}"
    )
    assert str(tmp_path / "no") in one_line_error(missing)
    unknown = one_line_error(gptkit("prepare", text, "--out", tmp_path / "nothing", "--tokenizer", "llama"))
    assert "unknown tokenizer 'llama'" in unknown and "model:PATH" in unknown
    assert not (tmp_path / "nothing").exists()
