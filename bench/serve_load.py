"""Serving under load: `gptkit serve` against llama-cpp-python's OpenAI server, same weights, loopback.

GPT-2 124M shape with random weights (seeded), written once as a gptkit checkpoint and exported with
`gptkit export gguf` (f32 and q8_0). Pairs: gptkit fp32 against llama-cpp-python on the f32 GGUF,
gptkit int8 (`--quantize int8`) against the q8_0 GGUF. Both servers of a pair run at once (an idle
server costs nothing) and take turns, A, B, A, B: for each number of concurrent clients (1, 4, 8, 16)
every client sends one streaming `/v1/completions` request (a 32-token prompt of its own, 128 new tokens,
greedy), and the round's wall time runs from the first request to the last byte.

Reported per server and client count: aggregate output tokens/s (median over rounds, with the
range), time to first token p50/p99 and inter-token latency p50/p99 over every request of every
round, errors (any non-200 answer, broken stream or timeout) and short answers (fewer tokens than
asked: an end-of-text drawn, or a server that cut the stream). Output tokens are the usage counts
when the server sends them; llama-cpp-python's stream has none, and one of its chunks may carry
several tokens (it holds back text that may end in a cut character), so an answer that ended for
length counts max_tokens and any other its content chunks. llama-cpp-python's server runs with
`--interrupt_requests False`: by default each new request cuts the streaming one short. Bounded: a
request times out after `--timeout` seconds and no round starts after `--max-minutes`.

    .venv/bin/pip install -e '.[serve]' 'llama-cpp-python[server]'   # llama.cpp builds ~6 minutes
    .venv/bin/python bench/serve_load.py                                # about 11 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tables import markdown  # bench/tables.py: scripts run from bench/

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
GPTKIT = [sys.executable, "-m", "gptkit"]


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_model(folder: Path) -> Path:
    """GPT-2 124M shape, random weights (seed 0), as a gptkit checkpoint with the GPT-2 tokenizer."""
    import torch

    from gptkit.checkpoint import save_checkpoint
    from gptkit.config import RunConfig
    from gptkit.model import GPT
    from gptkit.tokenizer import gpt2_tokenizer

    torch.manual_seed(0)
    config = RunConfig.model_validate({"model": {"preset": "gpt2", "vocab_size": 50257}})
    model = GPT(config.model)
    return save_checkpoint(
        folder / "gpt2-random.pt",
        model_state=model.state_dict(),
        config=config.model_dump(mode="json"),
        tokenizer=gpt2_tokenizer().describe(),
    )


def prompt_texts(n: int, count: int) -> list[str]:
    """`count` different prompts of `n` GPT-2 tokens: consecutive stretches of tiny Shakespeare (or
    numbered sentences), as text. Different, because llama-cpp-python's server keeps the last prompt's
    cache and reuses the longest prefix a new prompt shares with it: one prompt sent again and again
    would time its cache, not its prefill (its TTFT for a repeated 32-token prompt was ~40 ms)."""
    from gptkit.tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer()
    if SHAKESPEARE.exists():
        ids = tok.encode(SHAKESPEARE.read_text(encoding="utf-8")[: 8 * n * count])
    else:
        ids = tok.encode(
            " ".join(f"Line {k}: to be, or not to be, that is the question." for k in range(n * count))
        )
    if len(ids) < n * count:
        raise SystemExit(f"not enough text for {count} prompts of {n} tokens")
    return [tok.decode(ids[k * n : (k + 1) * n]) for k in range(count)]


@dataclass
class Server:
    name: str
    command: list[str]
    port: int
    ready_path: str
    proc: subprocess.Popen | None = None
    log: Path | None = None
    body: dict = field(default_factory=dict)  # the request, with the server's model id

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def model_id(self) -> str:
        """The id the server lists first in /v1/models: the `model` field its requests carry."""
        return httpx.get(self.url + "/v1/models", timeout=10).json()["data"][0]["id"]

    def start(self, logs: Path, timeout: float = 300) -> None:
        self.log = logs / f"{self.name.replace(' ', '_')}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "2", "GPTKIT_NO_PROGRESS": "1"}
        self.proc = subprocess.Popen(
            self.command, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.name} did not become ready in {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class Result:
    tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    error: str | None = None


async def one_request(client: httpx.AsyncClient, url: str, body: dict, timeout: float) -> Result:
    """One streaming completion; times its first content chunk and the gaps between chunks."""
    result = Result()
    t0 = time.perf_counter()
    last = None
    chunks = 0
    finish = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.tokens = chunk["usage"].get("completion_tokens", 0)
                finish = next(
                    (c["finish_reason"] for c in chunk.get("choices", []) if c.get("finish_reason")), finish
                )
                if any(c.get("text") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - t0
                    else:
                        result.gaps.append(now - last)
                    last = now
                    chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = type(e).__name__
    if not result.tokens:  # no usage in the stream (llama-cpp-python sends none)
        # a chunk may carry several tokens (llama-cpp-python holds back text that may be cut UTF-8):
        # an answer that ran to max_tokens has them all
        result.tokens = body["max_tokens"] if finish == "length" else chunks
    if result.error is None and result.ttft is None:
        result.error = "no tokens"
    return result


async def one_round(url: str, bodies: list[dict], timeout: float) -> tuple[float, list[Result]]:
    """One request per body, all at once (a client each)."""
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, body, timeout) for body in bodies))
        return time.perf_counter() - t0, list(results)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,4,8,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per request")
    parser.add_argument("--pairs", default="fp32,int8", help="fp32 (vs f32 GGUF), int8 (vs q8_0 GGUF)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request")
    parser.add_argument("--max-minutes", type=float, default=40, help="start no round after this")
    parser.add_argument("--max-batch", type=int, default=16, help="gptkit serve --max-batch")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    try:
        import llama_cpp  # noqa: F401
        import llama_cpp.server  # noqa: F401
    except ImportError:
        raise SystemExit("needs llama-cpp-python's server: pip install 'llama-cpp-python[server]'") from None
    clients = [int(c) for c in args.clients.split(",")]
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="gptkit-serve-load-"))
    progress(f"working in {work}")
    checkpoint = write_model(work)
    ggufs = {}
    for pair, gguf_type in (("fp32", "f32"), ("int8", "q8_0")):
        if pair in args.pairs.split(","):
            out = work / f"model-{gguf_type}.gguf"
            subprocess.run(
                [*GPTKIT, "export", "gguf", str(checkpoint), str(out), "--type", gguf_type], check=True
            )
            ggufs[pair] = (gguf_type, out)
    # every request of a server gets a prompt of its own; both servers of a pair get the same ones
    rounds = [(2, -1)] + [(n, r) for n in clients for r in range(args.rounds)]  # -1: the warm-up
    prompts = iter(prompt_texts(args.prompt, sum(n for n, _ in rounds)))
    prompt_sets = {(n, r): [next(prompts) for _ in range(n)] for n, r in rounds}
    body = {
        "max_tokens": args.new,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    load = os.getloadavg()[0]
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads per server, "
        f"load average at start {load:.2f}"
    )
    rows = []
    for pair, (gguf_type, gguf_path) in ggufs.items():
        ours = [*GPTKIT, "serve", str(checkpoint), "--port", "{port}", "--max-batch", str(args.max_batch)]
        ours += ["--max-queue", str(4 * max(clients))] + (["--quantize", "int8"] if pair == "int8" else [])
        theirs = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--host", "127.0.0.1"]
        theirs += [
            "--port",
            "{port}",
            "--n_threads",
            str(args.threads),
            "--n_ctx",
            "1024",
            "--n_batch",
            "512",
            "--interrupt_requests",  # by default a new request cuts the one streaming short
            "False",
        ]
        servers = []
        for name, command, ready in (
            (f"gptkit {pair}", ours, "/health"),
            (f"llama-cpp-python {gguf_type}", theirs, "/v1/models"),
        ):
            port = free_port()
            servers.append(Server(name, [c.replace("{port}", str(port)) for c in command], port, ready))
        try:
            for server in servers:
                progress(f"starting {server.name}")
                server.start(work)
                server.body = {**body, "model": server.model_id()}
                warm_up = [{**server.body, "prompt": prompt} for prompt in prompt_sets[2, -1]]
                _, warm = asyncio.run(one_round(server.url, warm_up, args.timeout))
                if any(x.error for x in warm):
                    raise SystemExit(f"{server.name} failed a request: {warm[0].error}; see {server.log}")
            for n in clients:
                walls: dict[str, list[float]] = {s.name: [] for s in servers}
                results: dict[str, list[Result]] = {s.name: [] for s in servers}
                for r in range(args.rounds):
                    if (time.time() - started) / 60 > args.max_minutes:
                        progress("--max-minutes reached: no more rounds")
                        break
                    for server in servers:
                        bodies = [{**server.body, "prompt": prompt} for prompt in prompt_sets[n, r]]
                        wall, res = asyncio.run(one_round(server.url, bodies, args.timeout))
                        walls[server.name].append(sum(x.tokens for x in res) / wall)
                        results[server.name] += res
                        errors = sum(x.error is not None for x in res)
                        rate = walls[server.name][-1]
                        progress(
                            f"{pair}, {n} clients, round {r + 1}: {server.name} {rate:.1f} tok/s, "
                            f"{errors} errors"
                        )
                reference = (
                    statistics.median(walls[servers[1].name]) if walls[servers[1].name] else float("nan")
                )
                for server in servers:
                    rates, res = walls[server.name], results[server.name]
                    if not rates:
                        continue
                    ttfts = [x.ttft for x in res if x.ttft is not None]
                    gaps = [g for x in res for g in x.gaps]
                    med = statistics.median(rates)
                    rows.append(
                        [
                            str(n),
                            server.name,
                            f"{med:.1f}",
                            f"{min(rates):.1f}-{max(rates):.1f}",
                            f"{med / reference:.2f}",
                            f"{1000 * pct(ttfts, 50):.0f}",
                            f"{1000 * pct(ttfts, 99):.0f}",
                            f"{1000 * pct(gaps, 50):.1f}",
                            f"{1000 * pct(gaps, 99):.1f}",
                            str(sum(x.error is not None for x in res)),
                            str(sum(x.error is None and x.tokens < args.new for x in res)),
                        ]
                    )
        finally:
            for server in servers:
                server.stop()
    header = ["clients", "server", "tok/s", "range", "x llama-cpp", "TTFT p50 ms", "TTFT p99 ms"]
    header += ["ITL p50 ms", "ITL p99 ms", "errors", "short"]
    print()
    print(markdown(header, rows))
    print(
        f"\n{args.rounds} rounds per client count, turns A, B, A, B; tok/s = all clients' output tokens "
        "over the round's wall time (median over rounds, range min-max); x llama-cpp = against the other "
        f"server of the pair at the same client count. Prompts of {args.prompt} tokens, a different one per "
        f"request (the same ones for both servers), {args.new} new tokens, greedy. "
        f"load at end {os.getloadavg()[0]:.2f}; {time.time() - started:.0f} s in all"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
