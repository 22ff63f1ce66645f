"""The sampler: cache vs full forwards, batching with padding, filters, seeds, stop strings, streaming."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli import gptkit_cli
from conftest import tiny_gpt

import gptkit
from gptkit.checkpoint import save_checkpoint
from gptkit.config import RunConfig
from gptkit.errors import GptkitError
from gptkit.generate import Sampler, SampleSettings, TextStream
from gptkit.generate import sampler as sampler_module
from gptkit.generate.choose import keep_top_k, keep_top_p, penalize_repeats
from gptkit.generate.cpu.linear import use_cpu_linear
from gptkit.generate.decoder import ForwardDecoder
from gptkit.generate.inference import fastest_decoder
from gptkit.model import GPT, KVCache
from gptkit.tokenizer import CharTokenizer, gpt2_tokenizer

TEXT = "hello world, the quick brown fox jumps over the lazy dog. ÄÖÜ äöü ß € 日本語 🙂\n"


def tiny_model(vocab_size: int, block_size: int = 64) -> GPT:
    """Weights x8: peaked distributions without near-ties, so greedy choices are robust to rounding."""
    return tiny_gpt(vocab_size, block_size=block_size, scale=8)


@pytest.fixture(scope="module")
def char() -> CharTokenizer:
    return CharTokenizer.train([TEXT])


@pytest.fixture(scope="module", params=["plain", "cpu-kernels"])
def sampler(request: pytest.FixtureRequest, char: CharTokenizer) -> Sampler:
    """Every sampler test runs on GPT.forward and on the model as gptkit.load prepares it for the CPU
    (gptkit's kernels decode a whole step in one call where they are built)."""
    model = tiny_model(char.vocab_size, block_size=128)
    if request.param == "plain":
        return Sampler(model, char)
    use_cpu_linear(model)
    return Sampler(model, char, fastest_decoder)


def greedy(**kw: object) -> SampleSettings:
    return SampleSettings.of(**{"temperature": 0, "stop_tokens": [], **kw})


def test_greedy_with_cache_equals_argmax_of_full_forwards(sampler: Sampler, char: CharTokenizer) -> None:
    prompt = char.encode("the quick")
    new = sampler.generate_ids([prompt], greedy(max_new_tokens=100))[0]
    assert len(new) == 100
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(100):
            logits = sampler.model(torch.tensor([tokens]))
            tokens.append(int(logits[0, -1].argmax()))
    assert new == tokens[len(prompt) :]
    assert len(set(new)) > 3, "a degenerate model would make this test weak"


def test_batched_prompts_of_different_lengths_equal_each_alone(sampler: Sampler, char: CharTokenizer) -> None:
    prompts = [char.encode(t) for t in ("h", "the lazy dog", "quick brown fox jumps", "€ 日本")]
    settings = greedy(max_new_tokens=40)
    batched = sampler.generate_ids(prompts, settings)
    alone = [sampler.generate_ids([p], settings)[0] for p in prompts]
    assert batched == alone


def test_padded_logits_equal_unpadded_logits(sampler: Sampler, char: CharTokenizer) -> None:
    """The padding mask and the shifted positions give each row exactly its own logits."""
    model = sampler.model
    short, long = char.encode("fox"), char.encode("the lazy dog")
    cache = model.new_cache(2)
    cache.set_padding(torch.tensor([len(long) - len(short), 0]))
    idx = torch.tensor([[0] * (len(long) - len(short)) + short, long])
    with torch.no_grad():
        both = model(idx, cache=cache)[:, -1]
        nxt = model(torch.tensor([[5], [5]]), cache=cache)[:, -1]
        ref_short = model(torch.tensor([short + [5]]))[0, -2:]
        ref_long = model(torch.tensor([long + [5]]))[0, -2:]
    torch.testing.assert_close(both[0], ref_short[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], ref_long[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nxt[0], ref_short[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nxt[1], ref_long[1], atol=1e-5, rtol=1e-5)


def test_top_k_1_equals_greedy(sampler: Sampler, char: CharTokenizer) -> None:
    prompt = [char.encode("over the")]
    top1 = SampleSettings.of(temperature=1.5, top_k=1, seed=3, stop_tokens=[], max_new_tokens=100)
    assert sampler.generate_ids(prompt, top1) == sampler.generate_ids(prompt, greedy(max_new_tokens=100))


def test_top_p_keeps_exactly_the_nucleus() -> None:
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15], [0.9, 0.04, 0.03, 0.02, 0.01]])
    logits = probs.log()
    kept = keep_top_p(logits, 0.8)
    # row 0: 0.4 + 0.3 = 0.7 < 0.8, + 0.15 = 0.85 >= 0.8: the nucleus is {1, 3, 4}
    assert torch.isfinite(kept[0]).tolist() == [False, True, False, True, True]
    assert torch.isfinite(kept[1]).tolist() == [True, False, False, False, False]
    renormalised = kept.softmax(-1)
    torch.testing.assert_close(renormalised[0, [1, 3, 4]], torch.tensor([0.4, 0.3, 0.15]) / 0.85)
    assert torch.isfinite(keep_top_p(logits, 0.7)[0]).tolist() == [False, True, False, True, False]
    assert torch.equal(keep_top_p(logits, 1.0), logits)
    assert torch.isfinite(keep_top_p(logits, 1e-6)).sum(-1).tolist() == [1, 1]  # the top token stays


def test_top_k_and_repetition_penalty() -> None:
    logits = torch.tensor([[1.0, 3.0, -2.0, 2.0]])
    assert torch.isfinite(keep_top_k(logits, 2)).tolist() == [[False, True, False, True]]
    seen = torch.tensor([[False, True, True, False]])
    assert penalize_repeats(logits, seen, 2.0).tolist() == [[1.0, 1.5, -4.0, 2.0]]


def test_repetition_penalty_changes_greedy_output(sampler: Sampler, char: CharTokenizer) -> None:
    prompt = [char.encode("the the the")]
    plain = sampler.generate_ids(prompt, greedy(max_new_tokens=60))[0]
    penalised = sampler.generate_ids(prompt, greedy(max_new_tokens=60, repetition_penalty=5.0))[0]
    assert plain != penalised
    assert len(set(penalised)) >= len(set(plain))


def test_seed_reproduces_and_samples_differ(sampler: Sampler) -> None:
    s = SampleSettings.of(max_new_tokens=50, seed=7, num_samples=3)
    first = sampler.generate(["the ", "fox"], s)
    assert first == sampler.generate(["the ", "fox"], s)
    assert len(first) == 2 and all(len(samples) == 3 for samples in first)
    assert len(set(first[0])) > 1, "three samples of one prompt differ"
    assert first != sampler.generate(["the ", "fox"], s.model_copy(update={"seed": 8}))


def test_stop_strings_end_the_text_where_they_should(sampler: Sampler, char: CharTokenizer) -> None:
    free = sampler.generate(["the"], greedy(max_new_tokens=80))[0][0]
    stop = free[10:13]
    cut = sampler.generate(["the"], greedy(max_new_tokens=80, stop=[stop]))[0][0]
    assert cut == free[: free.index(stop)]
    streamed = "".join(sampler.stream("the", greedy(max_new_tokens=80, stop=[stop])))
    assert streamed == cut


def test_stop_token_ends_a_sample(sampler: Sampler, char: CharTokenizer) -> None:
    free = sampler.generate_ids([char.encode("the")], greedy(max_new_tokens=50))[0]
    token = free[20]
    out = sampler.generate_ids([char.encode("the")], greedy(max_new_tokens=50, stop_tokens=[token]))[0]
    assert out == free[: free.index(token)]


def test_streamed_pieces_never_split_a_character() -> None:
    """GPT-2's byte-level tokens split multi-byte characters; no piece holds half of one."""
    tok = gpt2_tokenizer()
    ids = tok.encode(TEXT)
    assert len(ids) > len(TEXT.encode()) // 4  # some characters take several tokens
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    split = [i for i in ids if not tok.decode_bytes([i]).decode("utf-8", errors="ignore")]
    assert split, "the text has tokens that are only part of a character"


def test_stream_holds_back_a_possible_stop_string() -> None:
    char = CharTokenizer.train(["ab#cd"])
    stream = TextStream(char, stop=["###"])
    out = [stream.push(i) for i in char.encode("ab#c##d##")]
    assert out == ["a", "b", "", "#c", "", "", "##d", "", ""]
    assert stream.push(char.encode("#")[0]) == "" and stream.stopped
    assert stream.finish() == ""
    assert stream.text == "ab#c##d"


def test_stream_equals_generate_for_the_same_seed(sampler: Sampler) -> None:
    s = SampleSettings.of(max_new_tokens=60, seed=11)
    assert "".join(sampler.stream("quick", s)) == sampler.generate(["quick"], s)[0][0]


def test_the_sampler_decodes_with_the_decoder_it_is_given(char: CharTokenizer) -> None:
    """The decoder is a parameter (one per batch, every step through it); the default is GPT.forward."""
    made, steps = [], []

    class Counting(ForwardDecoder):
        def step(self, cache: KVCache, ids: torch.Tensor) -> torch.Tensor:
            steps.append(ids.size(0))
            return super().step(cache, ids)

    def decoder_for(model: GPT, batch_size: int) -> Counting:
        made.append(batch_size)
        return Counting(model)

    model = tiny_model(char.vocab_size, block_size=128)
    prompts = [char.encode("the quick"), char.encode("fox")]
    given = Sampler(model, char, decoder_for).generate_ids(prompts, greedy(max_new_tokens=20))
    assert made == [2] and steps == [2] * 19  # 19 steps of 2 sequences (the 20th token is not fed)
    assert given == Sampler(model, char).generate_ids(prompts, greedy(max_new_tokens=20))


def test_the_sampler_does_not_import_the_cpu_kernels() -> None:
    """It knows decoders only by their protocol; gptkit.generate.inference chooses gptkit's kernel."""
    tree = ast.parse(Path(sampler_module.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert "gptkit.generate.decoder" in imported
    assert not [m for m in imported if m.startswith("gptkit.generate.cpu")]


def test_the_package_and_its_settings_import_without_torch() -> None:
    """The CLI's parser reads SampleSettings for its defaults: `gptkit --help` must not load torch."""
    code = "import sys; from gptkit.generate import SampleSettings; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_long_prompt_and_generation_past_the_context(sampler: Sampler, char: CharTokenizer, capsys) -> None:
    block = sampler.model.config.block_size
    prompt = char.encode(TEXT * 3)
    assert len(prompt) > block
    out = sampler.generate_ids([prompt], greedy(max_new_tokens=2 * block))[0]
    assert len(out) == 2 * block
    assert f"keeps its last {block}" in capsys.readouterr().err
    # the kept part is what counts: the same as giving only the last block tokens
    assert out == sampler.generate_ids([prompt[-block:]], greedy(max_new_tokens=2 * block))[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("inf")), "temperature"),  # was accepted: every token equally likely
        (dict(temperature=float("nan")), "temperature"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temprature=0.5), "temperature"),  # a typo gets "did you mean"
    ],
)
def test_settings_out_of_range_are_one_line_errors(change: dict, message: str) -> None:
    with pytest.raises(GptkitError, match=message) as e:
        SampleSettings.of(**change)
    assert "\n" not in str(e.value)


def test_empty_prompt_is_an_error(sampler: Sampler) -> None:
    with pytest.raises(GptkitError, match="prompt is empty"):
        sampler.generate([""], greedy())


def write_checkpoint(path: Path, model: GPT, tok: CharTokenizer) -> Path:
    config = RunConfig(model=model.config)
    return save_checkpoint(
        path,
        model_state=model.state_dict(),
        config=config.model_dump(mode="json"),
        tokenizer=tok.describe(),
        progress={"step": 1, "tokens": 0},
    )


def test_load_api_from_checkpoint_and_run_folder(
    tmp_path: Path, sampler: Sampler, char: CharTokenizer
) -> None:
    ckpt = write_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000001.pt", sampler.model, char)
    for source in (ckpt, tmp_path / "run"):
        m = gptkit.load(source)
        assert (
            m.generate("the", temperature=0, max_new_tokens=30)
            == sampler.generate(["the"], greedy(max_new_tokens=30).model_copy(update={"stop_tokens": None}))[
                0
            ][0]
        )
    m = gptkit.load(ckpt)
    assert "".join(m.stream("the", temperature=0, max_new_tokens=30)) == m.generate(
        "the", temperature=0, max_new_tokens=30
    )
    assert len(m.generate(["a", "b"], max_new_tokens=5, num_samples=2, seed=1)) == 4
    with pytest.raises(GptkitError, match="not found"):
        gptkit.load(tmp_path / "missing.pt")
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(GptkitError, match="corrupt or truncated"):
        gptkit.load(tmp_path / "foreign.pt")
    with pytest.raises(GptkitError, match="not a run folder"):
        gptkit.load(tmp_path)
    with pytest.raises(GptkitError, match="top_p"):
        m.generate("x", top_p=2)


def test_sample_command(tmp_path: Path, sampler: Sampler, char: CharTokenizer) -> None:
    run = tmp_path / "run"
    write_checkpoint(run / "checkpoints" / "step_00000001.pt", sampler.model, char)
    expected = gptkit.load(run).generate("the", temperature=0, max_new_tokens=30)
    greedy_args = ["--temperature", "0", "--max-new-tokens", "30"]

    out = gptkit_cli("sample", str(run), "--prompt", "the", *greedy_args)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "the" + expected + "\n"
    streamed = gptkit_cli("sample", str(run), "--prompt", "the", "--stream", *greedy_args)
    assert streamed.stdout == out.stdout

    (tmp_path / "prompts.txt").write_text("the\n\nfox\n")
    both = gptkit_cli("sample", str(run), "--prompt-file", str(tmp_path / "prompts.txt"), *greedy_args)
    assert both.returncode == 0, both.stderr
    assert both.stdout.count("--- sample") == 2 and "the" + expected in both.stdout
    piped = gptkit_cli("sample", str(run), *greedy_args, stdin="the")
    assert piped.stdout == out.stdout

    seeded = ["--prompt", "fox", "--num-samples", "2", "--seed", "5", "--max-new-tokens", "20"]
    first, again = gptkit_cli("sample", str(run), *seeded), gptkit_cli("sample", str(run), *seeded)
    assert first.returncode == 0 and first.stdout == again.stdout and first.stdout.count("--- sample") == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "x", "--temperature", "-1"], "temperature"),
        (["--prompt", "x", "--temperature", "inf"], "temperature"),
        (["--prompt", "x", "--top-p", "0"], "top_p"),
        (["--prompt", ""], "prompt is empty"),
        (["--prompt-file", "missing.txt"], "prompt file 'missing.txt' not found"),
    ],
)
def test_sample_command_bad_input(
    tmp_path: Path, sampler: Sampler, char: CharTokenizer, args: list[str], message: str
) -> None:
    ckpt = write_checkpoint(tmp_path / "c.pt", sampler.model, char)
    out = gptkit_cli("sample", str(ckpt), *args)
    assert out.returncode == 2
    assert message in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_sample_command_on_a_missing_or_foreign_file(tmp_path: Path) -> None:
    out = gptkit_cli("sample", str(tmp_path / "nope.pt"), "--prompt", "x")
    assert out.returncode == 2 and "not found" in out.stderr
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    out = gptkit_cli("sample", str(tmp_path / "other.pt"), "--prompt", "x")
    assert out.returncode == 2 and "is not a gptkit checkpoint" in out.stderr
