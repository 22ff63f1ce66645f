"""Running the app with uvicorn: the address, the key, and the warning an open server deserves."""

from __future__ import annotations

import ipaddress

import uvicorn

from gptkit.console import notice
from gptkit.generate.textmodel import TextModel
from gptkit.serve.app import create_app


def exposed(host: str) -> bool:
    """Whether `host` binds every interface (reachable from other machines)."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host in ("", "*")


def run(
    model: TextModel,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    cors_origin: str | None = None,
) -> None:
    """Serve `model` until interrupted (Ctrl-C)."""
    if exposed(host) and not api_key:
        notice(
            f"warning: serving on {host} (every interface) without an API key: anyone who can reach this "
            "machine can use the model; set --api-key or GPTKIT_API_KEY"
        )
    app = create_app(
        model, api_key=api_key, max_batch=max_batch, max_queue=max_queue, cors_origin=cors_origin
    )
    notice(f"serving {model.source or 'the model'} at http://{host}:{port} (OpenAI API under /v1)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
