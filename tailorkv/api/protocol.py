"""The wire format: request bodies (pydantic, strict on types, unknown fields ignored) and the error body.

Every error of every route has one shape, OpenAI's: {"error": {"message", "type", "code"}}.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_BATCH = 1024  # prompts in one call


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code


def error_body(message: str, type: str, code: str | int | None) -> dict:
    return {"error": {"message": message, "type": type, "code": code}}


class _Body(BaseModel):
    # strict: "8" is not an int and 1 is not a bool; unknown fields (other OpenAI/SGLang options) are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class GenerateRequest(_Body):
    """SGLang /generate: one prompt (text or input_ids) or a batch of them."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict | list[dict] | None = None
    stream: bool = False

    @model_validator(mode="after")
    def _one_prompt_kind(self):
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        return self

    @property
    def batched(self) -> bool:
        return isinstance(self.text, list) or (
            bool(self.input_ids) and isinstance(self.input_ids[0], list)
        )

    def prompts(self) -> list[tuple[str | None, list[int] | None]]:
        """(text, input_ids) per request; raises APIError when the batch and its sampling_params disagree."""
        if not self.batched:
            items = [(self.text, self.input_ids)]
        elif self.text is not None:
            items = [(t, None) for t in self.text]
        else:
            items = [(None, ids) for ids in self.input_ids]
        if not items:
            raise APIError(400, "the batch is empty")
        if isinstance(self.sampling_params, list) and len(self.sampling_params) != len(items):
            raise APIError(
                400,
                f"sampling_params has {len(self.sampling_params)} entries for {len(items)} prompts",
            )
        return items

    def params(self, i: int) -> dict | None:
        return (
            self.sampling_params[i]
            if isinstance(self.sampling_params, list)
            else self.sampling_params
        )


class StreamOptions(_Body):
    include_usage: bool = False


class OpenAIRequest(_Body):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extensions that vLLM and SGLang accept too
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool | None = None

    def sampling_params(self, max_new_tokens: int) -> dict:
        if self.n != 1:
            raise APIError(
                400, f"only n=1 is supported, got n={self.n}", code="unsupported_parameter"
            )
        sp = {
            "max_new_tokens": max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "stop": self.stop,
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
        }
        return {k: v for k, v in sp.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict:
        content = (
            self.content
            if isinstance(self.content, str)
            else "".join(p.text for p in self.content or [])
        )
        return {"role": self.role, "content": content}


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: up to the end of the context
    max_completion_tokens: int | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class AbortRequest(_Body):
    rid: str | None = None
    abort_all: bool = False

    @model_validator(mode="after")
    def _one_target(self):
        if (self.rid is None) == (not self.abort_all):
            raise ValueError("give rid or abort_all: true")
        return self


class TokenizeRequest(_Body):
    prompt: str | list[str] = Field(max_length=MAX_BATCH)


class DetokenizeRequest(_Body):
    tokens: list[int]
    skip_special_tokens: bool = True
