"""Sampling settings: one validated set, shared by the CLI, chat, the server and the Python API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gptkit.config import validate


class SampleSettings(BaseModel):
    """How to pick each next token and when to stop. Out-of-range values are one-line errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_new_tokens: int = Field(256, ge=0, description="tokens to generate at most, per sample")
    temperature: float = Field(
        1.0, ge=0.0, allow_inf_nan=False, description="0: greedy (always the most likely token)"
    )
    top_k: int | None = Field(None, ge=1, description="sample among the k most likely tokens only")
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="sample from the nucleus: the fewest tokens holding p"
    )
    repetition_penalty: float = Field(
        1.0,
        gt=0.0,
        allow_inf_nan=False,
        description="> 1 discourages tokens already in the prompt or the output (CTRL's rule)",
    )
    presence_penalty: float = Field(
        0.0,
        ge=-2.0,
        le=2.0,
        description="subtracted once from the logit of every token already generated (OpenAI's)",
    )
    frequency_penalty: float = Field(
        0.0,
        ge=-2.0,
        le=2.0,
        description="subtracted from a token's logit once per time it was generated (OpenAI's)",
    )
    stop: list[str] = Field(default_factory=list, description="strings that end a sample (not included)")
    stop_tokens: list[int] | None = Field(None, description="token ids that end a sample; None: end-of-text")
    num_samples: int = Field(1, ge=1, le=1024, description="samples per prompt")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="report each token's log-probability and this many alternatives"
    )
    seed: int | None = Field(  # a 64-bit integer: what torch's generators take
        None, ge=-(2**63), le=2**63 - 1, description="the same seed and settings give the same text"
    )

    @classmethod
    def of(cls, settings: SampleSettings | None = None, **changes: Any) -> SampleSettings:
        """`settings` (or the defaults) with `changes` applied and validated; None values are ignored."""
        data = settings.model_dump() if settings is not None else {}
        data.update({k: v for k, v in changes.items() if v is not None})
        return validate(cls, data, "sampling settings")
