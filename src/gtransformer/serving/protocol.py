"""The OpenAI request and response shapes the server speaks, and their mapping onto `SamplingConfig`.

Requests are pydantic models with OpenAI's field names, types and defaults, so that
the official clients work unchanged with `base_url`; unknown fields are ignored (as
OpenAI does). Our extensions: `top_k` and `repetition_penalty` (1 = off). OpenAI's
`presence_penalty` / `frequency_penalty` have no exact equivalent in this model's
sampler: any non-zero value is refused with a 400 that names `repetition_penalty`.
Errors use OpenAI's body: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gtransformer.inference.sampling import SEED_LIMIT, SamplingConfig


# SamplingConfig's fields under the request's (OpenAI's) names.
API_NAMES = {"max_new_tokens": "max_tokens", "stop_strings": "stop"}


class APIError(Exception):
    """An error answered to the client: HTTP status + OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class SamplingFields(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    # Types only: the ranges of the sampling fields are SamplingConfig.problem's (checked in `sampling`), one
    # statement of them for the API, the CLI and training samples. allow_inf_nan=False: JSON's NaN / Infinity
    # (which Python's parser accepts) are refused as not finite.
    temperature: float = Field(default=1.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, allow_inf_nan=False)
    top_k: int = 0  # extension: 0 = off
    repetition_penalty: float = Field(default=1.0, allow_inf_nan=False)  # extension: 1 = off
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def sampling(self, max_tokens: int, seed_offset: int = 0) -> SamplingConfig:
        """The sampling rule of choice `seed_offset` (n > 1 choices with a seed get seed, seed + 1, ...)."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this model's sampler; use repetition_penalty "
                                    f"(> 1 discourages repeated tokens, 1 = off) instead", param=name)
        config = SamplingConfig(
            max_new_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            stop_strings=tuple(self.stop or ()),
            seed=self.seed,
        )
        problem = config.problem(API_NAMES)  # the sampling rules are SamplingConfig's, here as in the CLI
        if problem is not None:
            field, message = problem
            raise APIError(400, message, param=API_NAMES.get(field, field))
        seed = None if self.seed is None else (self.seed + seed_offset) % SEED_LIMIT
        return replace(config, top_k=self.top_k or None, seed=seed)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = ""
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
