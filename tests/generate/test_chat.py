"""Chat: templates (exact text, tokens, stored form), trimming, settings, stop strings and `gptkit chat`."""

from __future__ import annotations

import io
import random
import signal
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cli import gptkit_cli

import gptkit
from gptkit.checkpoint import load_checkpoint, save_checkpoint
from gptkit.cli import build_parser
from gptkit.config import RunConfig, load_config
from gptkit.errors import GptkitError
from gptkit.fused_loss import next_token_loss
from gptkit.generate.chat import Chat, run_chat
from gptkit.generate.settings import SampleSettings
from gptkit.generate.textmodel import TextModel
from gptkit.model import GPT
from gptkit.templates import ALPACA_SYSTEM, BUILTIN_TEMPLATES, ChatTemplate, alpaca_messages
from gptkit.tokenizer import CharTokenizer, gpt2_tokenizer

ALPACA = ChatTemplate.named("alpaca")
# the trained model's template: with no end-of-text after an answer, only the stop strings end a reply
TUNED = ChatTemplate.from_dict({**ALPACA.to_dict(), "name": "alpaca-no-eot", "eot_after_assistant": False})
PAIRS = [("hi", "hello"), ("bye", "see you"), ("ping", "pong")]
CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "ping"},
]


def run_config(vocab_size: int, block_size: int) -> RunConfig:
    return load_config(
        None,
        [
            "model.n_layer=2",
            "model.n_head=2",
            "model.n_embd=48",
            f"model.block_size={block_size}",
            f"model.vocab_size={vocab_size}",
            "model.dropout=0.0",
        ],
    )


def save(path: Path, model: GPT, tok: CharTokenizer, template: dict | None) -> Path:
    return save_checkpoint(
        path,
        model_state=model.state_dict(),
        config=run_config(tok.vocab_size, model.config.block_size).model_dump(mode="json"),
        tokenizer=tok.describe(),
        progress={"step": 1},
        chat_template=template,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GPT, CharTokenizer]]:
    """A tiny char model that learnt Alpaca-formatted conversations of PAIRS by heart.

    It is trained on TUNED.encode ids (as instruction tuning would), without end-of-text tokens, so
    after an answer it goes on with the next "### Instruction:": what the stop strings must cut.
    """
    rng = random.Random(0)
    conversations = []
    for _ in range(60):
        messages = []
        for q, a in rng.sample(PAIRS, len(PAIRS)):
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        conversations.append(messages)
    tok = CharTokenizer.train([ALPACA.render(conversations[0]), ALPACA_SYSTEM, "Be brief.?!"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is many times faster on a busy machine
    try:
        torch.manual_seed(0)
        model = GPT(run_config(tok.vocab_size, 128).model)
        data = torch.tensor([i for c in conversations for i in TUNED.encode(tok, c)[0]])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        # Train until every pair is answered as a first turn (as trained: no system prompt): how many
        # steps that takes depends on the CPU's rounding (400 sufficed on one machine, not another).
        for _ in range(10):
            for _ in range(200):
                ix = torch.randint(len(data) - 129, (8,))
                x, y = (torch.stack([data[i + d : i + d + 128] for i in ix]) for d in (0, 1))
                loss = next_token_loss(model, x, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            if knows_pairs(model.eval(), tok):
                break
            model.train()
        else:
            pytest.fail("the chat fixture model did not learn PAIRS in 2000 steps")
        yield model.eval(), tok
    finally:
        torch.set_num_threads(threads)


def knows_pairs(model: GPT, tok: CharTokenizer) -> bool:
    """Greedy first-turn replies (no system prompt) equal the answers."""
    settings = SampleSettings.of(temperature=0, max_new_tokens=30)
    for q, a in PAIRS:
        chat = Chat(TextModel(model, tok), template=TUNED, system="", settings=settings)
        if "".join(chat.reply(q)).strip() != a:
            return False
    return True


@pytest.fixture(scope="module")
def chat_ckpt(trained: tuple[GPT, CharTokenizer], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(tmp_path_factory.mktemp("chat") / "sft.pt", *trained, TUNED.to_dict())


@pytest.fixture(scope="module")
def base_ckpt(trained: tuple[GPT, CharTokenizer], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(tmp_path_factory.mktemp("base") / "base.pt", *trained, None)


def small_chat(system: str, block_size: int = 64) -> Chat:
    """An untrained model with the Alpaca template, 16 tokens kept for replies: for building prompts."""
    tok = CharTokenizer.train([string.printable])
    torch.manual_seed(0)
    model = TextModel(GPT(run_config(tok.vocab_size, block_size).model), tok)
    return Chat(model, template=ALPACA, system=system, settings=SampleSettings(max_new_tokens=16))


# ----------------------------------------------------------------------------------------- templates


def test_alpaca_template_renders_the_original_alpaca_prompt() -> None:
    plain = alpaca_messages({"instruction": "Name a colour.", "input": "", "output": "Blue."})
    assert ALPACA.render(plain) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.\n\n"
    )
    with_input = alpaca_messages({"instruction": "Add them.", "input": "2, 3", "output": "5"})
    assert ALPACA.render(with_input[:2], add_generation_prefix=True) == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd them.\n\n### Input:\n2, 3\n\n### Response:\n"
    )


def test_chat_and_plain_templates_render_exact_strings() -> None:
    chat = ChatTemplate.named("chat")
    assert chat.render(CONVO, add_generation_prefix=True) == (
        "Be brief.\nUser: hi\nAssistant: hello\nUser: ping\nAssistant: "
    )
    assert ChatTemplate.named("plain").render(CONVO) == "Be brief.\nhihello\nping"
    with pytest.raises(GptkitError, match="system message may only come first"):
        chat.render([*CONVO, {"role": "system", "content": "x"}])
    with pytest.raises(GptkitError, match="role one of"):
        chat.render([{"role": "robot", "content": "x"}])


def test_encode_is_the_rendered_text_with_targets_on_the_assistant_turns() -> None:
    messages = [*CONVO, {"role": "assistant", "content": "pong"}]
    tok = CharTokenizer.train([ALPACA.render(messages)])
    ids, mask = ALPACA.encode(tok, messages)
    assert len(ids) == len(mask)
    eots = [i for i, t in enumerate(ids) if t == tok.eot_id]
    assert len(eots) == 2 and all(mask[i] for i in eots), "an end-of-text ends each assistant turn"
    assert tok.decode([t for t in ids if t != tok.eot_id]) == ALPACA.render(messages)
    targets = tok.decode([t for t, m in zip(ids, mask, strict=True) if m and t != tok.eot_id])
    assert targets == "hello\n\npong\n\n", "the model learns the answers and their ends, nothing else"
    prompt, prompt_mask = ALPACA.encode(tok, CONVO, add_generation_prefix=True)
    assert tok.decode([t for t in prompt if t != tok.eot_id]) == ALPACA.render(CONVO, True)
    assert prompt[-len("### Response:\n") :] == tok.encode("### Response:\n") and not prompt_mask[-1]


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_the_chat_prompt_is_exactly_the_start_of_a_training_example(name: str) -> None:
    """With GPT-2's BPE, "Assistant: hello" as one string would merge " hello": pieces are tokenized apart."""
    template, tok = ChatTemplate.named(name), gpt2_tokenizer()
    example = [*CONVO, {"role": "assistant", "content": "pong"}]
    prompt, prompt_mask = template.encode(tok, CONVO, add_generation_prefix=True)
    ids, mask = template.encode(tok, example)
    assert ids[: len(prompt)] == prompt and mask[: len(prompt)] == prompt_mask and not prompt_mask[-1]
    answer = tok.encode("pong") + (tok.encode(template.assistant.suffix) if template.assistant.suffix else [])
    assert ids[len(prompt) :] == answer + ([tok.eot_id] if template.eot_after_assistant else [])
    assert all(mask[len(prompt) :])


def test_template_dict_round_trip_and_bad_stored_templates() -> None:
    for template in BUILTIN_TEMPLATES.values():
        assert ChatTemplate.from_dict(template.to_dict()) == template
        assert ChatTemplate.named(template.name) is template
    good = ALPACA.to_dict()
    assert set(good) == {"version", "name", "system", "user", "assistant", "default_system", "stop"} | {
        "eot_after_assistant"
    }
    bad = [
        "alpaca",
        {**good, "version": 2},
        {**good, "user": {"prefix": 3}},
        {**good, "colour": "blue"},
        {k: v for k, v in good.items() if k != "name"},
        {**good, "stop": "###"},
    ]
    for data in bad:
        with pytest.raises(GptkitError, match="chat template stored in x.pt") as e:
            ChatTemplate.from_dict(data, "x.pt")
        assert "\n" not in str(e.value)
    with pytest.raises(GptkitError, match="unknown chat template 'nope'; built-in templates: alpaca, chat"):
        ChatTemplate.named("nope")


def test_cli_template_choices_are_the_built_in_ones() -> None:
    chat = next(a for a in build_parser()._actions if a.dest == "command").choices["chat"]  # type: ignore[union-attr]
    choices = next(a.choices for a in chat._actions if a.dest == "template")
    assert set(choices) == {"auto", *BUILTIN_TEMPLATES}


# ------------------------------------------------------------------------------------- checkpoints


def test_the_template_round_trips_through_a_checkpoint(
    chat_ckpt: Path, base_ckpt: Path, tmp_path: Path
) -> None:
    loaded = gptkit.load(chat_ckpt, device="cpu")
    assert loaded.chat_template == TUNED.to_dict()
    assert Chat(loaded, system="").template == TUNED
    assert "chat_template" not in load_checkpoint(base_ckpt)
    assert gptkit.load(base_ckpt, device="cpu").chat_template is None

    payload = load_checkpoint(chat_ckpt)
    payload["chat_template"] = {**TUNED.to_dict(), "assistant": {"prefix": None}}
    del payload["sha256"]  # a checkpoint from before digests: its template is what gets checked
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(GptkitError, match=r"chat template stored in .*bad.pt is invalid \(assistant.prefix"):
        Chat(gptkit.load(tmp_path / "bad.pt", device="cpu"))
    out = gptkit_cli("chat", str(tmp_path / "bad.pt"), stdin="hi\n")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "invalid" in out.stderr and "--template" in out.stderr


# ------------------------------------------------------------------------------------------ prompts


def test_trimming_keeps_the_system_prompt_and_the_newest_turns() -> None:
    chat = small_chat(system="be brief.", block_size=128)
    turns = [(f"question {c}", f"answer {c}") for c in "abcdefghij"]
    for q, a in turns:
        chat.messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    tok, budget = chat.model.tokenizer, 128 - 16
    ids = chat.prompt_ids("last?")
    assert len(ids) <= budget
    kept = next(
        k for k in range(len(turns), -1, -1) if len(chat_prompt(chat, turns[len(turns) - k :])) <= budget
    )
    assert 0 < kept < len(turns)
    assert ids == chat_prompt(chat, turns[len(turns) - kept :]), "whole turns, the newest, in order"
    assert len(chat_prompt(chat, turns[len(turns) - kept - 1 :])) > budget, "as many as fit"
    text = tok.decode(ids)
    assert text.startswith("be brief.\n\n### Instruction:\nquestion ")
    assert text.endswith("### Instruction:\nlast?\n\n### Response:\n") and "answer j" in text
    assert "question a" not in text

    short = small_chat(system="be brief.", block_size=1024)
    short.messages = list(chat.messages)
    assert short.prompt_ids("last?") == chat_prompt(short, turns), "nothing is dropped when all fit"


def chat_prompt(chat: Chat, turns: list[tuple[str, str]], user: str = "last?") -> list[int]:
    messages = [{"role": "system", "content": chat.system}]
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": user})
    return chat.template.encode(chat.model.tokenizer, messages, add_generation_prefix=True)[0]


def test_a_message_too_long_for_the_context_keeps_its_end(capsys: pytest.CaptureFixture[str]) -> None:
    chat = small_chat(system="")
    chat.messages = [{"role": "user", "content": "old"}, {"role": "assistant", "content": "turn"}]
    long = "a" * 60 + "the end?"
    text = chat.model.tokenizer.decode(chat.prompt_ids(long))
    assert len(text) == 64 - 16
    assert text.startswith("### Instruction:\naaa") and text.endswith("aaathe end?\n\n### Response:\n")
    assert "kept its last" in capsys.readouterr().err


def test_a_system_prompt_too_long_for_the_context_is_one_error() -> None:
    with pytest.raises(GptkitError, match="take 55 of the model's 64-token context .* shorten --system"):
        small_chat(system="x" * 20)  # 20 + 35 template tokens, 16 kept for the reply
    chat = small_chat(system="")  # 33 template tokens
    chat.change_settings("max_new_tokens=24")
    with pytest.raises(GptkitError, match="leaving no room"):
        chat.change_settings("max_new_tokens=1000")  # keeps half the context for the reply: 32 left
    assert chat.settings.max_new_tokens == 24


# ----------------------------------------------------------------------------------------- settings


def test_settings_change_and_bad_values_keep_the_old_ones() -> None:
    chat = small_chat(system="")
    chat.change_settings("temperature=0.7 top-p=0.9 top_k=5 seed=3")
    s = chat.settings
    assert (s.temperature, s.top_p, s.top_k, s.seed) == (0.7, 0.9, 5, 3)
    chat.change_settings("top_k=none")
    assert chat.settings.top_k is None
    before = chat.settings
    for bad, message in [
        ("temperature=-1", "temperature"),
        ("top_p=0", "top_p"),
        ("top_p=1.5", "top_p"),
        ("temperature=warm", "temperature"),
        ("temperature=0.5 top_p=2", "top_p"),
        ("colour=blue", "cannot set 'colour=blue'"),
        ("temperature", "cannot set 'temperature'"),
    ]:
        with pytest.raises(GptkitError, match=message) as e:
            chat.change_settings(bad)
        assert "\n" not in str(e.value)
        assert chat.settings == before, bad
    assert "temperature=0.7 top_k=None top_p=0.9" in chat.describe_settings()


# ------------------------------------------------------------------------------------ conversation


def test_stop_strings_end_the_assistant_turn(chat_ckpt: Path) -> None:
    model = gptkit.load(chat_ckpt, device="cpu")
    prompt = TUNED.render([{"role": "user", "content": "hi"}], add_generation_prefix=True)
    raw = model.generate(prompt, temperature=0, max_new_tokens=40)
    assert raw.startswith("hello\n\n### Instruction:"), "without stop strings the model writes the next turn"
    chat = Chat(model, system="", settings=model.settings.of(temperature=0, max_new_tokens=40))
    pieces = list(chat.reply("hi"))
    assert "".join(pieces) == "hello" and len(pieces) > 1, "streamed, and cut before the next turn"
    assert chat.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert "".join(chat.reply("ping")) == "pong"
    assert len(chat.messages) == 4


def test_reset_really_clears_the_conversation(chat_ckpt: Path) -> None:
    chat = Chat(gptkit.load(chat_ckpt, device="cpu"), system="")
    chat.change_settings("temperature=0 max_new_tokens=20")
    fresh = chat.prompt_ids("bye")
    first = "".join(chat.reply("bye"))
    assert chat.prompt_ids("bye") != fresh and len(chat.messages) == 2
    chat.reset()
    assert chat.messages == [] and chat.prompt_ids("bye") == fresh
    assert "".join(chat.reply("bye")) == first


def test_empty_messages_are_one_line_errors(chat_ckpt: Path) -> None:
    chat = Chat(gptkit.load(chat_ckpt, device="cpu"), system="")
    for empty in ("", "   "):
        with pytest.raises(GptkitError, match="the message is empty"):
            list(chat.reply(empty))
    assert chat.messages == []


def test_base_model_continues_the_transcript(base_ckpt: Path) -> None:
    model = gptkit.load(base_ckpt, device="cpu")
    chat = Chat(model, settings=model.settings.of(temperature=0, max_new_tokens=12))
    assert chat.template.name == "plain" and chat.system == ""
    first = "".join(chat.reply("### Instruction:"))
    assert first == model.generate("### Instruction:", temperature=0, max_new_tokens=12).rstrip()
    assert first.startswith("\n")
    tok = model.tokenizer
    assert tok.decode(chat.prompt_ids("pong")) == "### Instruction:" + first + "\npong"


def test_the_loop_handles_commands_and_messages(chat_ckpt: Path) -> None:
    chat = Chat(gptkit.load(chat_ckpt, device="cpu"), system="")
    lines = ["/settings temperature=0 max_new_tokens=30\n", "/settings top_p=0\n", "/nope\n", "\n", "hi\n"]
    out, err = io.StringIO(), io.StringIO()
    assert run_chat(chat, [*lines, "/help\n", "/reset\n", "/exit\n", "bye\n"], out, err) == 0
    shown, errors = out.getvalue(), err.getvalue().splitlines()[1:]  # after the greeting
    assert "temperature=0.0" in shown and "\nhello\n" in shown and "/reset" in shown
    assert shown.endswith("(conversation cleared)\n"), "nothing after /exit"
    assert len(errors) == 3
    assert "top_p" in errors[0] and "unknown command /nope" in errors[1] and "empty" in errors[2]
    assert chat.messages == [] and chat.settings.temperature == 0 and chat.settings.top_p == 1.0


# ------------------------------------------------------------------------------------------- the CLI


def test_gptkit_chat_with_piped_input(chat_ckpt: Path) -> None:
    out = gptkit_cli(
        "chat",
        str(chat_ckpt),
        "--system",
        "",
        "--max-new-tokens",
        "30",
        stdin="/settings temperature=0\nhi\n/reset\nping\n/exit\nbye\n",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[2:] == ["hello", "(conversation cleared)", "pong"]
    assert "template alpaca" in out.stderr and "error" not in out.stderr


def test_gptkit_chat_with_a_base_model_ends_at_end_of_input(base_ckpt: Path) -> None:
    out = gptkit_cli("chat", str(base_ckpt), "--temperature", "0", "--max-new-tokens", "8", stdin="hi\n")
    assert out.returncode == 0, out.stderr
    assert "no chat template" in out.stderr and "template plain" in out.stderr
    assert out.stdout.strip()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "1.5"], "top_p"),
        (["--template", "alpaca", "--max-new-tokens", "8"], "leaving no room"),
    ],
)
def test_gptkit_chat_bad_settings_are_one_line(base_ckpt: Path, args: list[str], message: str) -> None:
    out = gptkit_cli("chat", str(base_ckpt), *args, stdin="hi\n")
    assert out.returncode == 2 and message in out.stderr
    assert out.stderr.count("\n") == 1 and out.stdout == ""


def test_gptkit_chat_bad_checkpoints_are_one_line(tmp_path: Path) -> None:
    out = gptkit_cli("chat", str(tmp_path / "nope.pt"))
    assert out.returncode == 2 and "not found" in out.stderr and out.stderr.count("\n") == 1
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    out = gptkit_cli("chat", str(tmp_path / "foreign.pt"))
    assert out.returncode == 2 and "is not a gptkit checkpoint" in out.stderr and out.stderr.count("\n") == 1


def test_ctrl_c_ends_the_chat_cleanly(chat_ckpt: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptkit", "chat", str(chat_ckpt), "--system", ""],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert "/help lists the commands" in proc.stderr.readline()  # waiting for input now
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
