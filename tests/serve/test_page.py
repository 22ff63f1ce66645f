"""The chat page at `/`, driven in headless Chromium (Debian's chromium + chromium-driver, through
Selenium) against a real `gptkit serve` on 127.0.0.1: streaming, stop, reload, settings, errors, phone
width. Nothing downloads a browser or a driver: both paths are given and Selenium Manager is offline.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from gptkit.checkpoint import save_checkpoint
from gptkit.config import load_config
from gptkit.model import GPT
from gptkit.templates import ChatTemplate
from gptkit.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
KEY = "page-test-key"
TEMPLATE = ChatTemplate.named("chat")
BLOCK = 1024  # long replies (one character a token) give the stop test time to press Stop

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "chromium and chromium-driver are not installed: apt-get install chromium chromium-driver",
        allow_module_level=True,
    )
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed: pip install selenium (in gptkit's dev extra)"
)
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------ server and browser


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained char model with the "chat" template that (almost) never ends a reply by itself.

    Its end-of-text logit is pushed about 10 below the others (one LayerNorm bias and the tied row), so
    replies run to max_tokens: long enough to be stopped. Unlike the API tests' peaked model, its other
    choices are near-uniform, so temperature visibly changes a reply; 4 layers of width 256 stream
    about 200 tokens/s on 2 busy cores, slow enough to watch.
    """
    tok = CharTokenizer.train([string.printable.replace("\x0b", "").replace("\x0c", "")])
    config = load_config(
        None,
        ["model.n_layer=4", "model.n_head=4", "model.n_embd=256", f"model.block_size={BLOCK}",
         f"model.vocab_size={tok.vocab_size}", "model.dropout=0.0"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config.model)
    with torch.no_grad():
        model.transformer.ln_f.bias[0] = 10.0
        model.transformer.wte.weight[tok.eot_id] = 0.0
        model.transformer.wte.weight[tok.eot_id, 0] = -1.0
    return save_checkpoint(
        tmp_path_factory.mktemp("page") / "chat.pt",
        model_state=model.state_dict(),
        config=config.model_dump(mode="json"),
        tokenizer=tok.describe(),
        chat_template=TEMPLATE.to_dict(),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, key: str | None = KEY) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def served(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`gptkit serve` with an API key on 127.0.0.1 and a free port, one row and one place in the queue
    (so that two held requests fill it); yields its base URL."""
    yield from serve(checkpoint, tmp_path_factory, ["--max-batch", "1", "--max-queue", "1"])


@pytest.fixture(scope="module")
def served_rag(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`gptkit serve --rag` over two small documents, indexed with the served model as embedder."""
    from gptkit.rag import index

    folder = tmp_path_factory.mktemp("docs")
    (folder / "tea.txt").write_text("Green tea is steeped at 80 degrees for two minutes.\n")
    (folder / "bread.txt").write_text("Bread rises because yeast turns sugar into gas.\n")
    embedder = f"model:{checkpoint}"
    index([str(folder)], folder / "index", embedder=embedder, chunk_tokens=64, overlap=0, progress=False)
    yield from serve(checkpoint, tmp_path_factory, ["--rag", str(folder / "index"), "--rag-k", "2"])


def serve(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, extra: list[str]) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gptkit", "serve", str(checkpoint), "--port", str(port), "--api-key", KEY]
            + extra,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"gptkit serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                if get(f"{url}/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gptkit serve did not answer /health in 120 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium from Debian's packages; Selenium Manager may not download anything."""
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900", "--lang=en-US"):  # fmt: skip
        options.add_argument(flag)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: Any, served: str) -> Any:
    """The page with the key set, a fresh conversation and desktop size (each test may change them)."""
    browser.set_window_size(1280, 900)
    browser.get(served + "/")
    settings = json.dumps({"api_key": KEY})
    browser.execute_script(f"localStorage.clear(); localStorage.setItem('gptkit.settings', '{settings}')")
    browser.refresh()
    model = model_id(served)
    wait_for(browser, lambda: find(browser, "model").text == model, f"the model's name {model!r}")
    return browser


# ------------------------------------------------------------------------------------------- page helpers


def wait_for(driver: Any, condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    try:
        wait = WebDriverWait(driver, timeout, 0.02, ignored_exceptions=[StaleElementReferenceException])
        return wait.until(lambda _: condition())
    except TimeoutException:
        pytest.fail(f"the page did not show {what} within {timeout} s")


def find(driver: Any, name: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, f'[data-testid="{name}"]')


def find_all(driver: Any, name: str) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, f'[data-testid="{name}"]')


def streaming(driver: Any) -> bool:
    return find(driver, "stop").is_displayed()


def reply_text(driver: Any) -> str:
    """The newest reply exactly as its DOM text holds it (not the rendered, whitespace-folded text),
    read in one step: the page redraws its messages when a reply ends."""
    script = "const e = [...document.querySelectorAll('[data-testid=reply-text]')].pop();"
    return driver.execute_script(script + "return e ? e.textContent : ''")


def shown_error(driver: Any) -> str | None:
    """The text of the error shown under the newest reply, if any (read in one step: the page redraws)."""
    script = "const e = [...document.querySelectorAll('[data-testid=error]')].pop();"
    return driver.execute_script(script + "return e && !e.hidden ? e.textContent : null")


def set_field(driver: Any, name: str, value: str) -> None:
    if not find(driver, "settings").is_displayed():
        find(driver, "settings-toggle").click()
    field = find(driver, name)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    if value:
        field.send_keys(value)


def send(driver: Any, text: str) -> None:
    """Types the message and presses Enter (Shift+Enter for its line breaks, as a person would)."""
    field = find(driver, "input")
    for i, line in enumerate(text.split("\n")):
        if i:
            field.send_keys(Keys.SHIFT, Keys.ENTER)
        field.send_keys(line)
    field.send_keys(Keys.ENTER)


def finished_reply(driver: Any, timeout: float = 60) -> str:
    wait_for(driver, lambda: not streaming(driver), "the end of the reply", timeout)
    return reply_text(driver)


def model_id(url: str) -> str:
    return json.loads(get(f"{url}/v1/models")[1])["data"][0]["id"]


def active(url: str) -> float:
    return metric(url, "gptkit_active_sequences")


def metric(url: str, name: str) -> float:
    """One unlabelled value of the server's /metrics (Prometheus text)."""
    status, text = get(f"{url}/metrics")
    assert status == 200, text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} in /metrics:\n{text}")


def hold(url: str) -> http.client.HTTPConnection:
    """Sends a long streamed request and leaves it running, unread; closing the connection cancels it."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    messages = [{"role": "user", "content": "wait"}]
    body = {"model": model_id(url), "messages": messages, "max_tokens": 900, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=headers)
    return connection


def chat_request(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def screenshot(driver: Any, tmp_path: Path, name: str) -> Path:
    """Saves a screenshot under pytest's tmp dir and copies it to test-artifacts/ (git-ignored)."""
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), f"could not write {path}"
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    copy = shutil.copy(path, artifacts / name)
    print(f"screenshot: {path} (copied to {copy})")
    return path


# ------------------------------------------------------------------------------------------------- tests


def test_a_reply_streams_into_the_page_as_text(page: Any, tmp_path: Path) -> None:
    set_field(page, "max-tokens", "800")
    message = "Hi <b>there</b> <img src=x onerror=alert(1)>\nsecond line"
    send(page, message)
    wait_for(page, lambda: streaming(page), "the Stop button while the reply streams")
    lengths = []
    while streaming(page):
        lengths.append(len(reply_text(page)))
        time.sleep(0.02)
    growth = sorted(set(lengths))
    assert len(growth) >= 3 and lengths == sorted(lengths), f"the reply did not grow across polls: {lengths}"
    reply = finished_reply(page)
    assert len(reply) == 800, "the model never ends a reply itself: it runs to max_tokens (one char a token)"

    # the user's text is shown as typed, and nobody's text became HTML
    assert find(page, "user-text").get_property("textContent") == message
    tags = page.execute_script(
        "return [...document.getElementById('messages').querySelectorAll('*')].map(e => e.tagName)"
    )
    assert set(tags) <= {"DIV", "SPAN", "BUTTON"}, tags
    stats = find(page, "reply-stats").text
    assert stats.startswith("800 tokens · ") and " tokens/s · " in stats, stats
    assert page.title.startswith("Hi <b>there</b>")
    screenshot(page, tmp_path, "chat-page.png")


def test_stop_ends_the_reply_and_the_server_frees_the_sequence(page: Any, served: str) -> None:
    set_field(page, "max-tokens", str(BLOCK - 100))
    send(page, "Tell me a long story.")
    wait_for(page, lambda: len(reply_text(page)) > 20, "the first characters of the reply")
    assert active(served) == 1
    find(page, "stop").click()
    wait_for(page, lambda: not streaming(page), "the Send button after Stop", timeout=5)
    stopped = reply_text(page)
    wait_for(page, lambda: active(served) == 0, "no active sequence in the server's /metrics", 2)
    time.sleep(0.5)
    assert reply_text(page) == stopped, "the reply went on growing after Stop"
    assert 20 < len(stopped) < BLOCK - 100
    assert "stopped" in find(page, "reply-stats").text
    assert not find(page, "error").is_displayed()

    # the stopped reply stays in the conversation, and the conversation goes on
    set_field(page, "max-tokens", "50")
    send(page, "Go on.")
    after = finished_reply(page)
    assert len(after) == 50
    assert [e.get_property("textContent") for e in find_all(page, "reply-text")] == [stopped, after]


def test_conversations_survive_a_reload_and_can_be_renamed_and_deleted(page: Any) -> None:
    set_field(page, "max-tokens", "40")
    send(page, "first chat")
    first = finished_reply(page)
    find(page, "new-chat").click()
    assert find_all(page, "reply") == [] and find(page, "title").text == "New chat"
    send(page, "second chat")
    second = finished_reply(page)

    titles = [t.text for t in find_all(page, "conversation-title")]
    assert titles == ["second chat", "first chat"], "newest first"
    item = find_all(page, "conversation")[1]
    item.find_element(By.CSS_SELECTOR, '[data-testid="rename"]').click()
    box = find(page, "rename-input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("Kept <i>chat</i>", Keys.ENTER)

    page.refresh()
    wait_for(page, lambda: len(find_all(page, "conversation")) == 2, "both conversations after the reload")
    assert [t.text for t in find_all(page, "conversation-title")] == ["second chat", "Kept <i>chat</i>"]
    assert reply_text(page) == second, "the open conversation is the one open before the reload"
    find_all(page, "conversation-title")[1].click()
    assert find(page, "title").text == "Kept <i>chat</i>"
    assert find(page, "user-text").text == "first chat" and reply_text(page) == first
    assert "40 tokens" in find(page, "reply-stats").text

    find_all(page, "conversation")[0].find_element(By.CSS_SELECTOR, '[data-testid="delete"]').click()
    alert = page.switch_to.alert
    assert alert.text == 'Delete "second chat"?'
    alert.accept()
    page.refresh()
    wait_for(page, lambda: len(find_all(page, "conversation")) == 1, "one conversation after deleting")
    assert [t.text for t in find_all(page, "conversation-title")] == ["Kept <i>chat</i>"]


def test_a_reload_mid_reply_keeps_what_arrived_and_frees_the_sequence(page: Any, served: str) -> None:
    set_field(page, "max-tokens", str(BLOCK - 100))
    send(page, "one")
    page.refresh()  # before any of the reply was saved: the chat ends with the question
    wait_for(page, lambda: active(served) == 0, "no active sequence after leaving the page", 5)
    assert find(page, "user-text").text == "one" and find_all(page, "reply") == []
    find(page, "regenerate").click()  # "Get a reply"
    stored = "return JSON.parse(localStorage.getItem('gptkit.conversations'))[0].messages[1]?.content ?? ''"
    saved = wait_for(page, lambda: page.execute_script(stored), "the streaming reply saved (every 250 ms)")
    assert streaming(page), "the reply is saved while it streams"
    seen = reply_text(page)
    page.refresh()
    wait_for(page, lambda: active(served) == 0, "no active sequence after leaving the page", 5)
    kept = reply_text(page)
    # all three are beginnings of the one reply (a save may fall between reading it and the reload)
    assert saved and kept.startswith(saved) and (seen.startswith(kept) or kept.startswith(seen))


def test_damaged_storage_keeps_what_is_readable(page: Any) -> None:
    good = {"id": "a", "title": "kept", "messages": [{"role": "user", "content": "hi"}, {"role": "x"}]}
    stored = [good, {"id": 1}, None, {"id": "b", "title": "no messages"}]
    script = "localStorage.setItem('gptkit.conversations', arguments[0]);"
    script += "localStorage.setItem('gptkit.settings', '{\"temperature\": 0.5, \"api_key\": null}')"
    page.execute_script(script, json.dumps(stored))
    page.refresh()
    assert [t.text for t in find_all(page, "conversation-title")] == ["kept"]
    find_all(page, "conversation-title")[0].click()
    assert [e.text for e in find_all(page, "user-text")] == ["hi"] and find_all(page, "reply") == []
    find(page, "settings-toggle").click()
    assert find(page, "temperature").get_property("value") == "0.5"
    assert find(page, "api-key").get_property("value") == ""


def test_temperature_and_the_system_prompt_reach_the_server(page: Any, served: str) -> None:
    set_field(page, "temperature", "0")
    set_field(page, "system", "Be brief.")
    set_field(page, "max-tokens", "60")
    page.refresh()  # the settings persist
    find(page, "settings-toggle").click()
    assert find(page, "temperature").get_property("value") == "0"
    assert find(page, "system").get_property("value") == "Be brief."

    send(page, "Say something.")
    greedy = finished_reply(page)
    alone = chat_request(
        served,
        {
            "model": find(page, "model").text,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Say something."},
            ],
            "temperature": 0,
            "max_tokens": 60,
        },
    )
    assert greedy == alone["choices"][0]["message"]["content"], "the page shows exactly the server's reply"

    find(page, "regenerate").click()
    assert finished_reply(page) == greedy, "temperature 0 is greedy: the same reply again"
    assert len(find_all(page, "reply")) == 1, "Regenerate replaces the last reply"

    set_field(page, "temperature", "1.5")
    find(page, "regenerate").click()
    assert finished_reply(page) != greedy, "at temperature 1.5 the reply differs from the greedy one"

    page.execute_cdp_cmd(
        "Browser.grantPermissions",
        {"origin": served, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
    )
    find(page, "copy").click()
    wait_for(page, lambda: find(page, "copy").text != "Copy", "the Copy button's answer", 5)
    assert find(page, "copy").text == "Copied"
    pasted = page.execute_async_script(
        "navigator.clipboard.readText().then(arguments[0], e => arguments[0](''))"
    )
    assert pasted == reply_text(page)


def test_server_errors_and_bad_settings_are_shown_as_text(page: Any, served: str) -> None:
    set_field(page, "api-key", "wrong-key")
    send(page, "hello")
    error = wait_for(page, lambda: shown_error(page), "an error")
    assert error.startswith("Error 401") and "API key" in error, error

    set_field(page, "api-key", KEY)
    set_field(page, "max-tokens", str(BLOCK * 4))
    find(page, "regenerate").click()
    error = wait_for(page, lambda: shown_error(page), "an error")
    assert error.startswith("Error 400") and "max_tokens" in error, error

    # a full queue: one held request decodes in the one row, the other waits in the one place
    set_field(page, "max-tokens", "")
    held = [hold(served)]
    wait_for(page, lambda: active(served) == 1, "the first held request decoding")
    held.append(hold(served))
    try:
        wait_for(page, lambda: metric(served, "gptkit_queued_requests") == 1, "the second request queued")
        find(page, "regenerate").click()
        error = wait_for(page, lambda: shown_error(page), "an error")
        assert error.startswith("Error 429") and "retry after" in error, error
    finally:
        for connection in held:
            connection.close()
    wait_for(page, lambda: active(served) == 0, "the held requests cancelled")

    set_field(page, "temperature", "7")
    find(page, "regenerate").click()
    error = wait_for(page, lambda: shown_error(page), "an error")
    assert error == 'temperature must be a number from 0 to 2, not "7"'


def test_the_page_works_at_phone_width(page: Any, tmp_path: Path) -> None:
    page.set_window_size(390, 844)
    assert page.execute_script("return window.innerWidth") <= 400
    set_field(page, "max-tokens", "80")
    find(page, "settings-toggle").click()
    send(page, "hello from a phone")
    reply = finished_reply(page)
    overflow = page.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than the phone"
    assert find(page, "send").is_displayed() and find(page, "input").is_displayed()
    assert find(page, "new-chat").location["x"] < 0, "the conversation list waits off screen"
    screenshot(page, tmp_path, "chat-page-phone.png")

    find(page, "new-chat-top").click()
    assert find(page, "title").text == "New chat" and find_all(page, "reply") == []
    find(page, "menu").click()
    wait_for(page, lambda: find(page, "new-chat").location["x"] >= 0, "the conversation list")
    find_all(page, "conversation-title")[0].click()
    wait_for(page, lambda: find(page, "new-chat").location["x"] < 0, "the list closing after a choice", 5)
    assert reply_text(page) == reply


def test_the_sources_of_an_answer_from_documents_are_shown(browser: Any, served_rag: str) -> None:
    browser.set_window_size(1280, 900)
    browser.get(served_rag + "/")
    settings = json.dumps({"api_key": KEY, "max_tokens": "5"})
    browser.execute_script(f"localStorage.clear(); localStorage.setItem('gptkit.settings', '{settings}')")
    browser.refresh()
    model = model_id(served_rag)
    wait_for(browser, lambda: find(browser, "model").text == model, f"the model's name {model!r}")
    set_field(browser, "max-tokens", "5")
    send(browser, "How long is green tea steeped?")
    finished_reply(browser)
    wait_for(browser, lambda: len(find_all(browser, "source")) == 2, "two sources under the reply")
    shown = sorted(e.text for e in find_all(browser, "source"))
    assert [t[:4] for t in shown] == ["[1] ", "[2] "]
    assert {t.split()[1].rstrip(",").rsplit("/", 1)[-1] for t in shown} == {"tea.txt", "bread.txt"}
    assert all(re.search(r", characters 0-\d+$", t) for t in shown), shown
