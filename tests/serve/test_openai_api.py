"""`gptkit serve` through the real `openai` client: models, completions and chat (streamed and not),
n, seeds, stop strings, usage, logprobs, and continuous batching (concurrent streams, disconnects)."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import torch
from serve.servers import Server, start

import gptkit
from gptkit.generate.settings import SampleSettings
from gptkit.generate.textmodel import TextModel
from gptkit.templates import ChatTemplate

PROMPT = "The quick brown fox"


def greedy(server: Server, prompt: str = PROMPT, max_tokens: int = 30, **kw: object):
    return server.client().completions.create(
        model=server.model_id, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw
    )


def active(server: Server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return float(re.search(r"^gptkit_active_sequences (\S+)$", text, re.M).group(1))


def test_models_lists_the_served_model(server: Server) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.model_id] == ["chat"]


def test_a_completion_is_what_the_python_api_generates(server: Server) -> None:
    out = greedy(server)
    expected = server.model.generate(PROMPT, temperature=0, max_new_tokens=30)
    assert out.choices[0].text == expected and len(expected) == 30
    assert out.choices[0].finish_reason == "length" and out.object == "text_completion"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(PROMPT), 30)
    assert out.usage.total_tokens == len(PROMPT) + 30


def test_a_streamed_completion_is_the_whole_one_with_usage_last(server: Server) -> None:
    whole = greedy(server).choices[0].text
    chunks = list(greedy(server, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 5, "streamed in pieces"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert all(c.usage is None for c in chunks[:-1])


def test_a_list_of_prompts_and_n_samples(server: Server) -> None:
    out = server.client().completions.create(
        model=server.model_id, prompt=["ab", "xyz"], n=2, max_tokens=12, temperature=1.0, seed=3
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    texts = [c.text for c in out.choices]
    assert texts[0] != texts[1] and texts[2] != texts[3], "two samples of one prompt differ"
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 48
    # the same seed gives the same samples, and they are the Python API's
    again = server.client().completions.create(
        model=server.model_id, prompt=["ab", "xyz"], n=2, max_tokens=12, temperature=1.0, seed=3
    )
    assert [c.text for c in again.choices] == texts
    assert server.model.generate(["ab", "xyz"], num_samples=2, max_new_tokens=12, seed=3) == texts
    other = server.client().completions.create(
        model=server.model_id, prompt=["ab", "xyz"], n=2, max_tokens=12, temperature=1.0, seed=4
    )
    assert [c.text for c in other.choices] != texts


def test_a_stop_string_split_across_tokens_never_leaks(server: Server) -> None:
    free = greedy(server, max_tokens=40).choices[0].text
    # three characters (three tokens of the char model) that first appear after the 10th
    start = next(i for i in range(10, 30) if free[i : i + 3] not in free[: i + 2])
    stop = free[start : start + 3]
    cut = greedy(server, max_tokens=40, stop=[stop, "never there"])
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in greedy(server, max_tokens=40, stop=stop, stream=True)]
    assert "".join(pieces) == free[: free.index(stop)]


def test_chat_streamed_and_not(server: Server) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    client = server.client()
    out = client.chat.completions.create(
        model=server.model_id, messages=messages, max_tokens=25, temperature=0
    )
    reply = out.choices[0].message
    assert reply.role == "assistant" and out.object == "chat.completion"
    # the reply is what the sampler gives the template's prompt, cut at the template's stop strings
    template = ChatTemplate.named("chat")
    ids = template.encode(server.model.tokenizer, messages, add_generation_prefix=True)[0]
    settings = SampleSettings.of(temperature=0, max_new_tokens=25, stop=template.stop)
    expected = server.model.sampler.generate([server.model.tokenizer.decode(ids)], settings)[0][0]
    assert reply.content == expected and out.usage.prompt_tokens == len(ids)
    chunks = list(
        client.chat.completions.create(
            model=server.model_id, messages=messages, max_tokens=25, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.content
    assert chunks[-2].choices[0].finish_reason == out.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == out.usage


def test_logprobs_are_the_models_log_softmax(server: Server) -> None:
    """Within fp32 rounding (the CPU kernel decodes; GPT.forward is the reference)."""
    tok, model = server.model.tokenizer, server.model.model
    out = greedy(server, max_tokens=8, logprobs=3)
    lp = out.choices[0].logprobs
    ids = tok.encode(PROMPT)
    for i, (token, logprob, top) in enumerate(
        zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True)
    ):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), dim=-1)
        (next_id,) = tok.encode(token)
        assert logprob == pytest.approx(float(ref[next_id]), abs=1e-3)
        best = torch.topk(ref, 3)
        assert list(top) == [tok.decode([int(j)]) for j in best.indices]
        assert list(top.values()) == pytest.approx(best.values.tolist(), abs=1e-3)
        assert next_id == int(best.indices[0]) and lp.text_offset[i] == len(PROMPT) + i
        ids.append(next_id)
    streamed = list(server.client().completions.create(
        model=server.model_id, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3, stream=True
    ))  # fmt: skip
    pieces = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for piece in pieces for t in piece.tokens] == lp.tokens
    assert [o for piece in pieces for o in piece.text_offset] == lp.text_offset
    assert [v for piece in pieces for v in piece.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-5)
    chat = server.client().chat.completions.create(
        model=server.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy: the best


def test_eight_concurrent_greedy_streams_each_get_their_text_alone(server: Server) -> None:
    prompts = [f"{i} {word}" for i, word in enumerate(["alpha", "be", "gamma!", "d", "epsilon", "zeta z",
                                                         "eta", "theta theta"])]  # fmt: skip
    alone = [greedy(server, p, max_tokens=40).choices[0].text for p in prompts]

    def streamed(prompt: str) -> str:
        return "".join(c.choices[0].text for c in greedy(server, prompt, max_tokens=40, stream=True))

    most, stop = [0.0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            most[0] = max(most[0], active(server))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(streamed, prompts))
    stop.set()
    watcher.join()
    assert together == alone
    assert most[0] > 1, "the streams decoded together"


def test_a_client_that_leaves_mid_stream_frees_its_slot(server: Server) -> None:
    body = {"model": server.model_id, "prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "stream": True}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{server.url}/v1/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert active(server) == 1, "still generating when the client leaves"
    deadline = time.monotonic() + 1.0
    while active(server) != 0:
        assert time.monotonic() < deadline, "the slot was not freed within a second"
        time.sleep(0.02)


def test_metrics_count_requests_tokens_and_latencies(server: Server) -> None:
    greedy(server, max_tokens=5)
    text = httpx.get(f"{server.url}/metrics").text

    def value(pattern: str) -> float:
        return float(re.search(rf"^{pattern} (\S+)$", text, re.M).group(1))

    assert value(r'gptkit_requests_total\{endpoint="/v1/completions",status="200"\}') >= 1
    assert value("gptkit_prompt_tokens_total") >= len(PROMPT)
    assert value("gptkit_completion_tokens_total") >= 5
    assert value("gptkit_queued_requests") == 0
    assert value("gptkit_time_to_first_token_seconds_count") >= 1
    assert value("gptkit_inter_token_seconds_count") >= 4


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantised_models_serve_what_they_generate(mode: str, chat_model: TextModel) -> None:
    """`--quantize`: the server decodes with the quantised model (int8 through the CPU kernel, int4
    through GPT.forward) and says what `gptkit.load(..., quantize=mode)` generates."""
    model = gptkit.load(chat_model.source, device="cpu", quantize=mode)
    with contextmanager(start)(model, max_batch=2, max_queue=2) as running:
        out = greedy(running, max_tokens=20)
    assert out.choices[0].text == model.generate(PROMPT, temperature=0, max_new_tokens=20)
