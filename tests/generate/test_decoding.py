"""The one generation loop with a changing batch: rows that join, leave, slide and move in the cache get
the logits `GPT.forward` gives each of them alone; per-row seeds, penalties, logprobs, cancellation."""

from __future__ import annotations

import pytest
import torch

from gptkit.config import load_config
from gptkit.generate import SampleSettings
from gptkit.generate.choose import draw, log_probabilities, penalize_counts, penalized
from gptkit.generate.cpu.linear import use_cpu_linear
from gptkit.generate.decoder import forward_decoder
from gptkit.generate.decoding import Decoding, Sequence, Step, row_seeds
from gptkit.generate.inference import fastest_decoder
from gptkit.model import GPT
from gptkit.tokenizer import CharTokenizer

TEXT = "hello world, the quick brown fox jumps over the lazy dog. 0123456789\n"


def tiny_model(vocab_size: int, block_size: int) -> GPT:
    torch.manual_seed(0)
    config = load_config(
        None,
        ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", f"model.block_size={block_size}",
         f"model.vocab_size={vocab_size}"],
    )  # fmt: skip
    model = GPT(config.model)
    with torch.no_grad():  # peaked, varied distributions
        for p in model.parameters():
            p.mul_(8)
    return model.eval()


@pytest.fixture(scope="module")
def char() -> CharTokenizer:
    return CharTokenizer.train([TEXT])


@pytest.fixture(scope="module", params=["forward", "cpu-kernel"])
def setup(request: pytest.FixtureRequest, char: CharTokenizer) -> tuple[GPT, object]:
    """GPT.forward decodes, or gptkit's CPU kernel where it is built (as gptkit.load prepares a model)."""
    model = tiny_model(char.vocab_size, block_size=32)
    if request.param == "forward":
        return model, forward_decoder
    use_cpu_linear(model)
    return model, fastest_decoder


def sampled(max_new: int, **kw: object) -> SampleSettings:
    return SampleSettings.of(temperature=1.0, stop_tokens=[], logprobs=20, max_new_tokens=max_new, **kw)


def reference(model: GPT, history: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([history]))[0, -1].float(), dim=-1)


def check(model: GPT, step: Step, before: list[int]) -> None:
    """The step's logprobs are the log-softmax of GPT.forward on the row's history, alone."""
    ref = reference(model, before)
    top = torch.topk(ref, 20)
    ids = [i for i, _ in step.top_logprobs]
    assert ids[:5] == top.indices[:5].tolist()
    # fp32 sums in other orders (the kernel's, oneDNN's): up to 2.2e-4 apart in this test's 51 steps
    torch.testing.assert_close(torch.tensor([v for _, v in step.top_logprobs]), top.values, atol=5e-4, rtol=0)
    if step.token is not None:
        assert step.logprob == pytest.approx(float(ref[step.token]), abs=5e-4)


def run(decoding: Decoding, model: GPT, steps: int, record: list) -> None:
    for _ in range(steps):
        for step in decoding.step():
            s = step.sequence
            before = s.history[:-1] if step.token is not None else s.history
            check(model, step, before)
            record.append(step)


def test_rows_that_join_leave_and_move_get_the_logits_they_would_get_alone(setup, char) -> None:
    """A waits; B (longer than the timeline so far: the others move right) is prefilled in chunks of
    4 while A decodes; C joins; A leaves and C moves into its slot; the cache (40 positions) fills and
    every row moves left. At every step every row's logprobs equal GPT.forward's on its own history."""
    model, decoder_for = setup
    decoding = Decoding(model, char, decoder_for, rows=3, max_len=40, chunk=4)
    record: list[Step] = []
    (a,) = decoding.add(char.encode("the fox"), sampled(12), row_seeds(1, 1))
    run(decoding, model, 3, record)
    (b,) = decoding.add(char.encode("over the lazy dog"), sampled(14), row_seeds(2, 1))
    run(decoding, model, 2, record)
    assert decoding.prefill is not None, "B is still being prefilled, a chunk per step"
    (c,) = decoding.add(char.encode("quick"), sampled(25), row_seeds(3, 1))
    positions, owners = [], []
    while decoding.busy:
        run(decoding, model, 1, record)
        positions.append(decoding.slots.pos)
        owners.append(len(decoding.slots.owners))
    assert [len(s.tokens) for s in (a, b, c)] == [12, 14, 25]
    assert all(s.finish_reason == "length" for s in (a, b, c))
    assert max(owners) >= 2
    assert any(positions[i + 1] < positions[i] for i in range(len(positions) - 1)), "the rows moved left"
    assert len(record) == 12 + 14 + 25


def test_a_row_samples_the_same_alone_or_in_a_batch(setup, char) -> None:
    model, decoder_for = setup

    def tokens(prompts: list[str], max_len: int | None = None) -> list[list[int]]:
        decoding = Decoding(model, char, decoder_for, rows=4, max_len=max_len)
        seqs = [decoding.add(char.encode(p), sampled(20), row_seeds(7, 1))[0] for p in prompts]
        while decoding.busy:
            decoding.step()
        return [s.tokens for s in seqs]

    alone = tokens(["the"])[0]
    assert tokens(["quick brown", "the", "a"])[1] == alone
    assert tokens(["the", "x"], max_len=32)[0] == alone


def test_a_cancelled_row_leaves_at_the_next_step(setup, char) -> None:
    model, decoder_for = setup
    decoding = Decoding(model, char, decoder_for, rows=2)
    a, b = decoding.add(char.encode("the"), sampled(20), row_seeds(1, 2))
    decoding.step()
    assert len(decoding.slots.owners) == 2
    a.cancel()
    steps = decoding.step()
    assert decoding.slots.owners == [b] and a.finish_reason == "cancelled"
    assert [s.finish_reason for s in steps if s.sequence is a] == ["cancelled"]
    assert len(a.tokens) == 1 and len(b.tokens) == 2


def test_a_prompt_cancelled_while_its_prefill_runs_stops_it(setup, char) -> None:
    """A long prompt prefills a chunk per step beside a running row; cancelled midway, it ends at the
    next step without running the rest."""
    model, decoder_for = setup
    decoding = Decoding(model, char, decoder_for, rows=2, chunk=4)
    (running,) = decoding.add(char.encode("the"), sampled(40), [1])
    decoding.step()
    (late,) = decoding.add(char.encode("the quick brown fox"), sampled(40), [2])
    decoding.step()
    assert decoding.prefill is not None and decoding.prefill.remaining > 0
    late.cancel()
    steps = decoding.step()
    assert [s.finish_reason for s in steps if s.sequence is late] == ["cancelled"]
    assert decoding.prefill is None and decoding.slots.owners == [running]


def test_two_samples_of_one_prompt_share_its_prefill_and_differ(setup, char) -> None:
    model, decoder_for = setup
    decoding = Decoding(model, char, decoder_for, rows=2)
    seqs = decoding.add(char.encode("the"), sampled(20), row_seeds(5, 2))
    decoding.step()
    assert decoding.slots.pad.tolist() == [0, 0] and decoding.slots.pos == 3
    while decoding.busy:
        decoding.step()
    assert seqs[0].tokens != seqs[1].tokens


def test_presence_and_frequency_penalties_are_openais_additive_rule() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6)
    counts = torch.tensor([[0, 1, 3, 0, 0, 2], [1, 0, 0, 0, 5, 0]])
    expected = logits.clone()
    for b in range(2):
        for j in range(6):
            c = int(counts[b, j])
            expected[b, j] -= 0.5 * (c > 0) + 0.25 * c
    torch.testing.assert_close(penalize_counts(logits, counts, 0.5, 0.25), expected)
    settings = SampleSettings.of(presence_penalty=0.5, frequency_penalty=0.25)
    torch.testing.assert_close(penalized(logits, settings, None, counts), expected)
    assert torch.equal(penalized(logits, SampleSettings(), None, counts), logits)


def test_penalties_change_what_a_sequence_draws(setup, char) -> None:
    model, decoder_for = setup

    def greedy(**kw: object) -> list[int]:
        decoding = Decoding(model, char, decoder_for, rows=1)
        settings = SampleSettings.of(temperature=0, stop_tokens=[], max_new_tokens=25, **kw)
        (s,) = decoding.add(char.encode("the the"), settings, [0])
        while decoding.busy:
            decoding.step()
        return s.tokens

    plain, penalised = greedy(), greedy(frequency_penalty=2.0, presence_penalty=2.0)
    assert plain != penalised
    assert max(penalised.count(t) for t in penalised) <= max(plain.count(t) for t in plain)


def test_draw_follows_the_distribution_and_never_picks_an_impossible_token() -> None:
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    generator = torch.Generator().manual_seed(0)
    draws = torch.rand(20000, generator=generator)
    ids = draw(probs.expand(20000, 6), draws)
    freq = torch.bincount(ids, minlength=6).float() / 20000
    assert freq[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    edge = draw(probs[None], torch.tensor([1.0 - 1e-12]))
    assert probs[edge].item() > 0


def test_log_probabilities_are_the_raw_log_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    chosen, ids, values = log_probabilities(logits, torch.tensor([2]), 2)
    ref = torch.log_softmax(logits, -1)
    assert chosen.item() == pytest.approx(ref[0, 2].item())
    assert ids.tolist() == [[0, 1]] and values[0].tolist() == pytest.approx(ref[0, :2].tolist())


def test_row_seeds_are_reproducible_and_distinct() -> None:
    assert row_seeds(3, 4) == row_seeds(3, 4) and len(set(row_seeds(3, 4))) == 4
    assert row_seeds(3, 4) != row_seeds(4, 4) and row_seeds(None, 2) != row_seeds(None, 2)


def test_a_sequence_without_tokens_to_make_ends_at_once(char) -> None:
    model = tiny_model(char.vocab_size, block_size=32)
    decoding = Decoding(model, char, forward_decoder, rows=1)
    (s,) = decoding.add(char.encode("x"), SampleSettings.of(max_new_tokens=0), [0])
    assert isinstance(s, Sequence) and s.finish_reason == "length"
    assert [(st.token, st.finish_reason) for st in decoding.step()] == [(None, "length")]
    assert not decoding.busy
