"""Running the app with uvicorn: the address, the key, and the warning an open server deserves."""

from __future__ import annotations

import ipaddress
import socket

import uvicorn

from gptkit.console import notice
from gptkit.errors import GptkitError
from gptkit.generate.textmodel import TextModel
from gptkit.serve.app import Rag, create_app


def exposed(host: str) -> bool:
    """Whether `host` binds every interface (reachable from other machines)."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host in ("", "*")


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on `host`:`port` (0: a free port), made before the model loads so that a port
    in use is a one-line error at once and the address printed is the real one. It listens at once:
    a client that connects as soon as the address is printed waits in the backlog until the server
    accepts, instead of being refused while uvicorn starts."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise GptkitError(f"cannot listen on {host!r}: {e}; give --host an address of this machine") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as e:
        sock.close()
        raise GptkitError(
            f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port (0 picks a free one)"
        ) from None
    return sock


def run(
    model: TextModel,
    sock: socket.socket,
    *,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    cors_origin: str | None = None,
    rag: Rag | None = None,
) -> None:
    """Serve `model` on the bound socket `sock` until interrupted (Ctrl-C)."""
    host, port = sock.getsockname()[:2]
    if exposed(host) and not api_key:
        notice(
            f"warning: serving on {host} (every interface) without an API key: anyone who can reach this "
            "machine can use the model; set --api-key or GPTKIT_API_KEY"
        )
    app = create_app(
        model, api_key=api_key, max_batch=max_batch, max_queue=max_queue, cors_origin=cors_origin, rag=rag
    )
    shown = f"[{host}]" if ":" in host else host
    notice(f"serving {model.source or 'the model'} at http://{shown}:{port} (OpenAI API under /v1)")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
    if not server.started:
        raise GptkitError("the server did not start (its error is above)")
    if server.should_exit:
        # Stopped by Ctrl-C or SIGTERM. uvicorn raises the signal again once it has shut down, but
        # that has not always reached us: one CI run's server answered SIGINT by exiting 0, silently.
        raise KeyboardInterrupt
