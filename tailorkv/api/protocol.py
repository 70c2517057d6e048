"""The wire format: request bodies (pydantic, strict on types; /generate's and /v1's unknown fields are a 400 unless
null or at a no-op value) and the error body.

Every error of every route has one shape, OpenAI's: {"error": {"message", "type", "code"}}.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..engine.request import RequestOptions

MAX_BATCH = 1024  # prompts in one call
MAX_TOP_LOGPROBS = 20  # most likely tokens per position


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


# sent by some clients, with no effect on the completion: accepted and ignored (any other unknown field is a 400)
IGNORED_OPENAI_FIELDS = ("user", "metadata", "store", "parallel_tool_calls")
# SGLang extensions that sglang-router and sglang.bench_serving fill in with these values: no effect here, so
# accepted at them (the reasoning fields act only with a reasoning parser, which this server has not)
NO_OP_VALUES = {
    "background": False,
    "continue_final_message": False,
    "log_metrics": True,
    "no_logs": False,
    "return_bytes": False,
    "return_entropy": False,
    "return_hidden_states": False,
    "return_routed_experts": False,
    "separate_reasoning": True,
    "stream_reasoning": True,
}


def drop_no_ops(model: type[BaseModel], data, ignored: tuple[str, ...] = ()):
    """`data` without the fields `model` does not declare that are null, at their NO_OP_VALUES or `ignored`:
    any other undeclared field stays, for extra="forbid" to answer with a 400 naming it."""
    if not isinstance(data, dict):
        return data
    return {
        k: v
        for k, v in data.items()
        if k in model.model_fields
        or not (v is None or k in ignored or (k in NO_OP_VALUES and NO_OP_VALUES[k] == v))
    }


class GenerateRequest(_Body):
    """SGLang /generate: one prompt (text or input_ids) or a batch of them; another field is a 400 naming it
    unless it is null or at a no-op value (drop_no_ops)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict | list[dict] | None = None
    stream: bool = False
    rid: str | list[str] | None = Field(None, max_length=MAX_BATCH)  # the client's id of each
    return_logprob: bool = False
    logprob_start_len: int = Field(-1, ge=-1)  # -1: no prompt logprobs
    top_logprobs_num: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    return_text_in_logprobs: bool = False

    @model_validator(mode="before")
    @classmethod
    def _drop_no_ops(cls, data):
        return drop_no_ops(cls, data)

    @model_validator(mode="after")
    def _one_prompt_kind(self):
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        if self.rid is not None and isinstance(self.rid, list) != self.batched:
            raise ValueError("rid must be a list for a batch and a string for one prompt")
        return self

    def options(self, n: int) -> list[RequestOptions]:
        """Logprobs and the client's id of each of the `n` prompts; raises APIError when a batch's rid list
        disagrees."""
        if isinstance(self.rid, list) and len(self.rid) != n:
            raise APIError(400, f"rid has {len(self.rid)} entries for {n} prompts")
        rids = self.rid if isinstance(self.rid, list) else [self.rid] * n
        logprobs = self.top_logprobs_num if self.return_logprob else None
        start = (
            self.logprob_start_len if self.return_logprob and self.logprob_start_len >= 0 else None
        )
        return [RequestOptions(logprobs, start, rid) for rid in rids]

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


class JsonSchemaFormat(_Body):
    name: str
    schema_: dict | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # the schema is always enforced
    description: str | None = None


class ResponseFormat(_Body):
    """OpenAI's response_format: text, json_object (any JSON object) or json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self

    def schema_text(self) -> str | None:
        """The JSON schema the output must follow, as SGLang's json_schema (JSON text); None: free text."""
        if self.type == "text":
            return None
        schema = self.json_schema.schema_ if self.type == "json_schema" else None
        return json.dumps(schema if schema is not None else {"type": "object"})


class OpenAIRequest(_Body):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # extensions that vLLM and SGLang accept too
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    response_format: ResponseFormat | None = None
    tools: list | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data):
        return drop_no_ops(cls, data, IGNORED_OPENAI_FIELDS)

    def sampling_params(self, max_new_tokens: int) -> dict:
        if self.tools:
            raise APIError(400, "tools are not supported yet", code="unsupported_parameter")
        sp = {
            "max_new_tokens": max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "stop": self.stop,
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
            "json_schema": self.response_format and self.response_format.schema_text(),
            "n": self.n,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logit_bias": self.logit_bias,
            "min_new_tokens": self.min_tokens,
            "stop_token_ids": self.stop_token_ids,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
            "no_stop_trim": self.no_stop_trim,
        }
        return {k: v for k, v in sp.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    best_of: int | None = None  # only equal to n: the server does not rank completions
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = (
        False  # the prompt before the completion (and its logprobs from the first token on)
    )

    def options(self) -> RequestOptions:
        return RequestOptions(self.logprobs, 0 if self.echo and self.logprobs is not None else None)

    @model_validator(mode="after")
    def _best_of_is_n(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of must equal n ({self.n}) here, got {self.best_of}")
        return self


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
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def options(self) -> RequestOptions:
        return RequestOptions((self.top_logprobs or 0) if self.logprobs else None)

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
        if self.rid is None and not self.abort_all:
            raise ValueError("give rid or abort_all: true")
        return self


class TokenizeRequest(_Body):
    prompt: str | list[str] = Field(max_length=MAX_BATCH)


class DetokenizeRequest(_Body):
    tokens: list[int]
    skip_special_tokens: bool = True
