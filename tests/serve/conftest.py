"""Session fixtures of the serve tests: the served models, and the servers, started once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'gptkit[serve]'")
pytest.importorskip("openai", reason="the openai client is not installed (gptkit's dev extra)")

from servers import KEY, Server, char_checkpoint, start  # noqa: E402

import gptkit  # noqa: E402
from gptkit.generate.textmodel import TextModel  # noqa: E402
from gptkit.templates import ChatTemplate  # noqa: E402


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> TextModel:
    """The served chat model, loaded as `gptkit serve` loads it (gptkit's CPU kernel decodes)."""
    ckpt = char_checkpoint(tmp_path_factory.mktemp("serve") / "chat.pt", ChatTemplate.named("chat"))
    return gptkit.load(ckpt, device="cpu")


@pytest.fixture(scope="session")
def server(chat_model: TextModel) -> Iterator[Server]:
    """The open server: no key, 8 rows, room in the queue."""
    yield from start(chat_model, max_batch=8, max_queue=16)


@pytest.fixture(scope="session")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A base model (no chat template) behind a key, one row and one place in the queue; larger, so
    that a stream of 1000 tokens lasts seconds (a request waits in the queue meanwhile)."""
    ckpt = char_checkpoint(tmp_path_factory.mktemp("serve") / "base.pt", None, n_layer=4, n_embd=384)
    model = gptkit.load(ckpt, device="cpu")
    yield from start(model, api_key=KEY, max_batch=1, max_queue=1, keepalive=0.2)
