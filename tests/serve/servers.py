"""What the serve tests share: small char models and real uvicorn servers on 127.0.0.1 with
ephemeral ports, run in this process (so tests compare what a server says with the very model it
serves). The session fixtures in conftest.py start them once."""

from __future__ import annotations

import socket
import string
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch
import uvicorn

from gptkit.checkpoint import save_checkpoint
from gptkit.config import load_config
from gptkit.generate.textmodel import TextModel
from gptkit.model import GPT
from gptkit.serve.app import create_app
from gptkit.templates import ChatTemplate
from gptkit.tokenizer import CharTokenizer

KEY = "serve-test-key"
BLOCK = 1024  # long enough that a stream of 1000 tokens lasts about a second


def char_checkpoint(path: Path, template: ChatTemplate | None, n_layer: int = 2, n_embd: int = 128) -> Path:
    """An untrained char model with peaked distributions (no near-ties for greedy decoding to flip on)
    whose end-of-text is unlikely, so that replies run to max_tokens."""
    tok = CharTokenizer.train([string.printable.replace("\x0b", "").replace("\x0c", "") + "äöü€"])
    config = load_config(
        None,
        [f"model.n_layer={n_layer}", "model.n_head=4", f"model.n_embd={n_embd}", f"model.block_size={BLOCK}",
         f"model.vocab_size={tok.vocab_size}", "model.dropout=0.0"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config.model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6)
        model.transformer.ln_f.bias[0] = 30.0
        model.transformer.wte.weight[tok.eot_id] = 0.0
        model.transformer.wte.weight[tok.eot_id, 0] = -1.0
    return save_checkpoint(
        path,
        model_state=model.state_dict(),
        config=config.model_dump(mode="json"),
        tokenizer=tok.describe(),
        chat_template=None if template is None else template.to_dict(),
    )


@dataclass
class Server:
    """A running server: its URL, the model it serves, and the key it wants (if any)."""

    url: str
    model: TextModel
    model_id: str
    key: str | None

    def client(self, **kw: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key or "none", max_retries=0, **kw)


def start(model: TextModel, **settings: object) -> Iterator[Server]:
    app = create_app(model, **settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the test server did not start")
        time.sleep(0.02)
    try:
        yield Server(f"http://127.0.0.1:{port}", model, app.state.served.model_id, settings.get("api_key"))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
