"""`gptkit serve`: an OpenAI-compatible HTTP server over the one sampler, with continuous batching.

`engine` (one thread runs the generation loop for every request), `protocol` (OpenAI's requests and
responses as pydantic models), `metrics` (Prometheus), `app` (the FastAPI app), `server` (uvicorn).
FastAPI, uvicorn and prometheus_client come with the `serve` extra: `pip install gptkit[serve]`.
"""
