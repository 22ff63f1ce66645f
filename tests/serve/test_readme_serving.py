"""The README's Serving examples run as written against a real server (its address put in)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from servers import Server

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
SECTION = re.search(r"^## Serving\n(.*?)^## ", README, re.M | re.S).group(1)
DEFAULT = "http://127.0.0.1:8000"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", SECTION, re.S)


def test_the_python_example_runs(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    (code,) = [b for b in blocks("python") if "from openai import OpenAI" in b]
    assert DEFAULT in code
    exec(compile(code.replace(DEFAULT, server.url), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert len(printed) > 40  # the chat reply, then the streamed completion


def test_the_curl_example_runs(server: Server) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    (line,) = [line for b in blocks("bash") for line in b.splitlines() if line.startswith("curl ")]
    command = line.replace(DEFAULT, server.url).replace('"model": "tiny"', f'"model": "{server.model_id}"')
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    reply = json.loads(out.stdout)
    assert reply["object"] == "text_completion" and len(reply["choices"][0]["text"]) == 20
