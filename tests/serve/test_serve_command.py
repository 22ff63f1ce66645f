"""`gptkit serve` on the command line: its options, and bad input as one-line errors before serving."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
from cli import gptkit_cli
from serve.servers import char_checkpoint

from gptkit.serve.server import listen


def test_serve_help_lists_the_options() -> None:
    out = gptkit_cli("serve", "--help")
    assert out.returncode == 0
    for option in ("--host", "--port", "--api-key", "--quantize", "--adapter", "--max-batch", "--max-queue",
                   "--cors-origin"):  # fmt: skip
        assert option in out.stdout
    assert "127.0.0.1" in out.stdout


def test_bad_input_is_one_line_before_anything_is_served(tmp_path: Path) -> None:
    out = gptkit_cli("serve", str(tmp_path / "missing.pt"))
    assert out.returncode == 2 and "not found" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    out = gptkit_cli("serve", str(tmp_path / "missing.pt"), "--max-batch", "0")
    assert out.returncode == 2 and "--max-batch" in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_the_command_serves_on_a_free_port_and_says_which(tmp_path: Path) -> None:
    """`--port 0` binds a free port and prints the real address; Ctrl-C stops the server
    with one line, as it stops any command."""
    ckpt = char_checkpoint(tmp_path / "base.pt", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptkit", "serve", str(ckpt), "--port", "0"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stderr.readline()
        found = re.search(r"at http://127\.0\.0\.1:(\d+) ", line)
        assert found and found.group(1) != "0", line
        url = f"http://127.0.0.1:{found.group(1)}"
        assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"
        done = httpx.post(
            f"{url}/v1/completions", json={"model": "base", "prompt": "ab", "max_tokens": 3}, timeout=60
        ).json()
        assert done["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and rest.strip() == "gptkit: interrupted", rest  # as any command


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = gptkit_cli("serve", str(tmp_path / "missing.pt"), "--port", str(port))
    assert out.returncode == 2 and f"127.0.0.1:{port}" in out.stderr and "--port" in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1, out.stderr


def test_the_socket_takes_connections_as_soon_as_the_address_is_printed() -> None:
    """The address is printed before uvicorn starts: a client that connects then is queued, not refused
    (it was refused on a loaded machine while the socket was bound but not yet listening)."""
    sock = listen("127.0.0.1", 0)
    try:
        with socket.create_connection(sock.getsockname()[:2], timeout=5):
            pass
    finally:
        sock.close()
