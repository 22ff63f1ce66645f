"""HuggingFace export and import, judged by transformers itself (random weights, nothing downloaded)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is a dev dependency: pip install -e .[dev]"
)
safetensors_torch = pytest.importorskip(
    "safetensors.torch", reason="needs the export extra: pip install -e .[export]"
)

from conftest import shared_file, tiny_gpt  # noqa: E402

import gptkit  # noqa: E402
from gptkit.api import export_model  # noqa: E402
from gptkit.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from gptkit.cli import main  # noqa: E402
from gptkit.config import RunConfig  # noqa: E402
from gptkit.errors import GptkitError  # noqa: E402
from gptkit.fused_loss import next_token_loss  # noqa: E402
from gptkit.generate.sampler import Sampler  # noqa: E402
from gptkit.generate.settings import SampleSettings  # noqa: E402
from gptkit.interop.hf import export_hf, gpt2_files, import_hf, load_hf  # noqa: E402
from gptkit.loading import load_model  # noqa: E402
from gptkit.model import GPT  # noqa: E402
from gptkit.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, gpt2_tokenizer  # noqa: E402

# 69 distinct characters + end-of-text = 70 ids: not a multiple of 64, so the embedding has padding rows
CHARS = "".join(chr(c) for c in range(ord(" "), ord(" ") + 68)) + "\n"


def tiny(
    tokenizer: Tokenizer, *, seed: int = 0, bias: bool = True, n_embd: int = 64, n_layer: int = 2
) -> GPT:
    shape = {"n_layer": n_layer, "n_head": 4, "n_embd": n_embd, "bias": bias}
    return tiny_gpt(tokenizer.vocab_size, seed=seed, random_vectors=True, **shape)


def char_tokenizer() -> CharTokenizer:
    return CharTokenizer.train(CHARS)


def hf_model(folder: Path) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    return model


@pytest.mark.parametrize("bias", [True, False])
def test_transformers_logits_equal_ours(tmp_path: Path, bias: bool) -> None:
    tok = char_tokenizer()
    model = tiny(tok, bias=bias)
    assert model.config.padded_vocab_size == 128 and tok.vocab_size == 70
    export_hf(model, tok, tmp_path / "hf")
    assert {p.name for p in (tmp_path / "hf").iterdir()} >= {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    theirs = hf_model(tmp_path / "hf")
    torch.manual_seed(1)
    for batch, length in ((1, 64), (3, 17), (4, 40)):
        ids = torch.randint(0, tok.vocab_size, (batch, length))
        with torch.no_grad():
            ours = model(ids)
            hf_logits = theirs(ids).logits
        assert hf_logits.shape == ours.shape == (batch, length, 70)
        assert (hf_logits - ours).abs().max().item() < 1e-4


def test_transformers_greedy_generation_equals_ours(tmp_path: Path) -> None:
    tok = char_tokenizer()
    model = tiny(tok, seed=3)
    export_hf(model, tok, tmp_path / "hf")
    theirs = hf_model(tmp_path / "hf")
    prompt = tok.encode("TO BE, OR")
    with torch.no_grad():
        hf_out = theirs.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=50)[0, len(prompt) :]
    ours = Sampler(model, tok).generate_ids([prompt], SampleSettings(temperature=0, max_new_tokens=50))[0]
    assert len(ours) == 50  # end-of-text never came first (it would end both at the same token)
    assert hf_out.tolist() == ours


def test_gpt2_vocab_and_merges_equal_the_original_files() -> None:
    """Derived from the shipped tiktoken ranks, byte for byte OpenAI's encoder.json and vocab.bpe."""
    vocab, merges = gpt2_files()
    assert vocab.encode() == shared_file("tokenizer/encoder.json").read_bytes()
    assert merges.encode() == shared_file("tokenizer/vocab.bpe").read_bytes()


@pytest.mark.parametrize("kind", ["gpt2", "bpe", "char"])
def test_exported_tokenizer_ids_equal_ours_on_shakespeare(
    tmp_path: Path, shakespeare: Path, kind: str
) -> None:
    text = shakespeare.read_text(encoding="utf-8")
    tok: Tokenizer = {
        "gpt2": gpt2_tokenizer,
        "bpe": lambda: BPETokenizer.train(text[:300_000], 1000),
        "char": lambda: CharTokenizer.train(text),
    }[kind]()
    model = tiny(tok, n_embd=32, n_layer=1)  # gpt2: the real 50257-id vocabulary
    export_hf(model, tok, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    ids = theirs(text, add_special_tokens=False)["input_ids"]
    assert ids == tok.encode(text)
    assert theirs.decode(ids) == text
    assert (
        theirs.eos_token_id == tok.eot_id
        and theirs.vocab_size + len(theirs.added_tokens_decoder) >= tok.vocab_size
    )
    if kind == "gpt2":  # the real vocabulary size through the model too
        hf = hf_model(tmp_path / "hf")
        sample = torch.tensor([ids[:64]])
        with torch.no_grad():
            assert (hf(sample).logits - model(sample)).abs().max().item() < 1e-4


def random_hf_folder(folder: Path, *, vocab: int = 300, base_model: bool = False) -> torch.nn.Module:
    """A randomly initialised GPT2LMHeadModel saved by transformers, with a byte-level BPE tokenizer."""
    torch.manual_seed(5)
    config = transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=64, n_positions=48, vocab_size=vocab, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(std=0.1)
    (model.transformer if base_model else model).save_pretrained(folder)
    bpe = BPETokenizer.train(" ".join(f"word{i} thing{i % 7}" for i in range(3000)), vocab)
    assert bpe.vocab_size == vocab
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._hf, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return model


@pytest.mark.parametrize("base_model", [False, True], ids=["GPT2LMHeadModel", "GPT2Model-names"])
def test_import_random_hf_model_gives_its_logits(tmp_path: Path, base_model: bool) -> None:
    theirs = random_hf_folder(tmp_path / "hf", base_model=base_model)
    ckpt = import_hf(tmp_path / "hf", tmp_path / "imported.pt")
    model, tok, config = load_model(load_checkpoint(ckpt))
    assert tok.kind == "bpe" and config.model.vocab_size == 300 and config.model.padded_vocab_size == 320
    ids = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max().item() < 1e-4
    # sampling and evaluation take it as they take a trained checkpoint
    text = gptkit.load(ckpt, device="cpu").generate("word1", max_new_tokens=5, temperature=0)
    assert isinstance(text, str) and text
    assert torch.isfinite(next_token_loss(model, ids[:, :-1], ids[:, 1:]))


def test_import_then_export_round_trips_the_tensors_exactly(tmp_path: Path) -> None:
    random_hf_folder(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "imported.pt")
    model, tok, _ = load_model(load_checkpoint(tmp_path / "imported.pt"))
    export_hf(model, tok, tmp_path / "back")
    before = safetensors_torch.load_file(tmp_path / "hf" / "model.safetensors")
    after = safetensors_torch.load_file(tmp_path / "back" / "model.safetensors")
    before.pop("lm_head.weight", None)  # tied: transformers may or may not store it
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert (
        json.loads((tmp_path / "back" / "tokenizer.json").read_text())["model"]
        == json.loads((tmp_path / "hf" / "tokenizer.json").read_text())["model"]
    )
    # the same import as a weights-only safetensors checkpoint holds the same tensors
    import_hf(tmp_path / "hf", tmp_path / "imported.safetensors")
    same, _, _ = load_model(load_checkpoint(tmp_path / "imported.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, same.state_dict()[name]), name


def test_load_and_pytorch_bin_and_gpt2_without_tokenizer_files(tmp_path: Path) -> None:
    """A legacy pytorch_model.bin with GPT-2's vocabulary size and no tokenizer files: GPT-2's tokenizer."""
    torch.manual_seed(2)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path / "old"
    folder.mkdir()
    config.save_pretrained(folder)
    torch.save(theirs.state_dict(), folder / "pytorch_model.bin")
    loaded = gptkit.load(folder, device="cpu")  # a HF folder straight into the Python API
    assert loaded.tokenizer.kind == "gpt2"
    ids = torch.tensor([gpt2_tokenizer().encode("Hello world, this is GPT-2.")])
    with torch.no_grad():
        assert (theirs(ids).logits - loaded.model(ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_imported_checkpoint_trains_finetunes_and_evaluates(tmp_path: Path, suffix: str) -> None:
    """An import is a starting point for `train --resume PATH`, `finetune` and `eval`."""
    torch.manual_seed(3)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ckpt = gptkit.import_model(tmp_path / "hf", tmp_path / f"imported{suffix}")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 300)
    gptkit.prepare([str(text)], tmp_path / "data", tokenizer="gpt2", progress=False, workers=1)
    shape = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32"]
    common = [f"runs_dir={tmp_path / 'runs'}", f"data.path={tmp_path / 'data'}", "eval.sample_tokens=0"]
    common += ["train.micro_batch_size=2", "train.tokens_per_step=64", "train.warmup_steps=0"]
    # a learning rate of 1e-12: one step changes no weight by more than ~1e-12, so the trained weights
    # show where training started
    run = gptkit.train(
        None, [*shape, *common, "train.max_steps=1", "train.lr=1e-12", "train.min_lr=0"], resume=str(ckpt)
    )
    assert run.step == 1
    trained = load_checkpoint(run.checkpoint)["model"]
    imported = load_model(load_checkpoint(ckpt))[0].state_dict()
    assert max(float((trained[k] - imported[k]).abs().max()) for k in imported) < 1e-6
    tuned = gptkit.finetune(
        None, [*common, f"finetune.base={ckpt}", "finetune.method=lora", "train.max_steps=2", "name=tuned"]
    )
    assert tuned.step == 2
    result = gptkit.evaluate(ckpt, "perplexity", text=str(text), progress=False)[0]["results"]["perplexity"]
    ids = torch.tensor([[50256, *gpt2_tokenizer().encode(text.read_text())[:31]]])
    with torch.no_grad():
        first = float(theirs(ids, labels=ids).loss)  # HF's loss on the first window
    assert math.isfinite(result["ppl"]) and abs(math.log(result["ppl"]) - first) < 0.05


def test_safetensors_checkpoint_keeps_weights_config_and_tokenizer(tmp_path: Path) -> None:
    tok = char_tokenizer()
    model = tiny(tok)
    run = RunConfig(model=model.config)
    save_checkpoint(
        tmp_path / "a.pt",
        model_state=model.state_dict(),
        config=run.model_dump(mode="json"),
        tokenizer=tok.describe(),
        progress={"step": 7},
    )
    (out,) = export_model(tmp_path / "a.pt", "safetensors", tmp_path / "a.safetensors")
    with safetensors_torch.safe_open(str(out), framework="pt") as f:  # safetensors' own reader
        assert "transformer.wte.weight" in f.keys() and "lm_head.weight" not in f.keys()  # noqa: SIM118
        assert json.loads(f.metadata()["progress"]) == {"step": 7}
    payload = load_checkpoint(out)
    again, tok2, _ = load_model(payload)
    assert tok2.describe() == tok.describe() and payload["state"] == {}
    assert again.lm_head.weight is again.transformer.wte.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    data = bytearray(out.read_bytes())  # tensor bytes changed after writing: safetensors loads them
    data[-100:-84] = bytes(b ^ 0xFF for b in data[-100:-84])
    out.write_bytes(bytes(data))
    with pytest.raises(GptkitError, match=r"a.safetensors' fails its content check"):
        load_checkpoint(out)


def test_bad_input_is_one_clear_error(tmp_path: Path) -> None:
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    (mistral / "config.json").write_text(
        json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    )
    with pytest.raises(GptkitError, match="'mistral' model \\(MistralForCausalLM\\), which gptkit does not"):
        import_hf(mistral, tmp_path / "x.pt")
    relu = tmp_path / "relu"
    relu.mkdir()
    (relu / "config.json").write_text(json.dumps({"model_type": "gpt2", "activation_function": "relu"}))
    with pytest.raises(GptkitError, match="activation_function='relu'"):
        import_hf(relu, tmp_path / "x.pt")
    with pytest.raises(GptkitError, match="no config.json"):
        import_hf(tmp_path, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()

    tok = char_tokenizer()
    model = tiny(tok)
    export_hf(model, tok, tmp_path / "hf")
    with pytest.raises(GptkitError, match="already exists; .* pass --force"):
        export_hf(model, tok, tmp_path / "hf")
    export_hf(tiny(tok, seed=9), tok, tmp_path / "hf", force=True)  # a previous export: replaced
    assert not torch.equal(load_hf(tmp_path / "hf")[0].transformer.wpe.weight, model.transformer.wpe.weight)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(GptkitError, match="gptkit did not export there .notes.txt."):
        export_hf(model, tok, precious, force=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_a_model_with_tensors_gpt2_has_no_place_for_is_refused(tmp_path: Path) -> None:
    """A prompt-tuned model's soft prompt would be dropped silently: every target refuses it."""
    from gptkit.finetuning.prompt_tuning import add_soft_prompt
    from gptkit.interop.gguf import export_gguf
    from gptkit.interop.onnx import export_onnx

    tok = BPETokenizer.train("some text to train on " * 50, 300)
    model = tiny(tok)
    model = add_soft_prompt(model, 4)
    for export in (
        lambda: export_hf(model, tok, tmp_path / "hf"),
        lambda: export_onnx(model, tmp_path / "m.onnx"),
        lambda: export_gguf(model, tok, tmp_path / "m.gguf"),
    ):
        with pytest.raises(GptkitError, match="cannot express soft_prompt"):
            export()
    assert list(tmp_path.iterdir()) == []


def test_cli_export_and_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tok = char_tokenizer()
    model = tiny(tok)
    save_checkpoint(
        tmp_path / "m.pt",
        model_state=model.state_dict(),
        config=RunConfig(model=model.config).model_dump(mode="json"),
        tokenizer=tok.describe(),
    )
    out = subprocess.run(  # the real command once; the rest through the same entry point in-process
        [sys.executable, "-m", "gptkit", "export", "hf", str(tmp_path / "m.pt"), str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "hf")
    assert main(["export", "hf", str(tmp_path / "m.pt"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--force" in err
    assert main(["export", "hf", str(tmp_path / "m.pt"), str(tmp_path / "x"), "--type", "q8_0"]) == 2
    assert "--type applies to gguf exports only" in capsys.readouterr().err
    assert main(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "back.pt")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "back.pt")
    back, _, _ = load_model(load_checkpoint(tmp_path / "back.pt"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def test_exports_keep_the_umask_mode(tmp_path: Path) -> None:
    """Every exported file gets the mode the umask gives new files (safetensors writes 0600 itself)."""
    tok = char_tokenizer()
    model = tiny(tok, n_layer=1)
    save_checkpoint(
        tmp_path / "m.pt",
        model_state=model.state_dict(),
        config=RunConfig(model=model.config).model_dump(mode="json"),
        tokenizer=tok.describe(),
    )
    script = (
        "from gptkit.api import export_model\n"
        f"for target, out in (('hf', 'hf'), ('safetensors', 'w.safetensors'), ('onnx', 'm.onnx')):\n"
        f"    export_model({str(tmp_path / 'm.pt')!r}, target, {str(tmp_path)!r} + '/' + out)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, umask=0o027, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = [p for p in tmp_path.rglob("*") if p.name != "m.pt"]
    assert tmp_path / "hf" / "model.safetensors" in files
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert modes == {p.name: oct(0o750 if p.is_dir() else 0o640) for p in files}
