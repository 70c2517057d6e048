"""Checks of the sampling fields beyond the basic ones (penalties, logit bias, n, stop regexes, detokenizing
options): every one bounded, so that one request cannot make each step of the batch slow."""

from __future__ import annotations

import math

import regex

from ..config import InputLimits
from ..errors import InvalidRequestError


def _number(value, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be in [{low:g}, {high:g}], got {value}")
    return value


def _flag(value, name: str) -> None:
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a boolean")


def validate_extras(p, limits: InputLimits) -> None:
    """Check (and normalise: logit_bias keys to ints, stop_regex to a list) the fields of SamplingParams `p`
    beyond the basic ones, within `limits`; raises InvalidRequestError."""
    if isinstance(p.min_new_tokens, bool) or not isinstance(p.min_new_tokens, int):
        raise InvalidRequestError("min_new_tokens must be an integer")
    if not 0 <= p.min_new_tokens <= p.max_new_tokens:
        raise InvalidRequestError(
            f"min_new_tokens must be in [0, max_new_tokens={p.max_new_tokens}], got {p.min_new_tokens}"
        )
    _number(p.frequency_penalty, "frequency_penalty", -2, 2)
    _number(p.presence_penalty, "presence_penalty", -2, 2)
    if _number(p.repetition_penalty, "repetition_penalty", 0, 2) == 0:
        raise InvalidRequestError("repetition_penalty must be > 0")
    if p.logit_bias is not None:
        if not isinstance(p.logit_bias, dict) or len(p.logit_bias) > limits.logit_bias:
            raise InvalidRequestError(
                f"logit_bias must be an object of at most {limits.logit_bias} token ids"
            )
        bias = {}
        for k, v in p.logit_bias.items():
            token = k if isinstance(k, int) and not isinstance(k, bool) else None
            if isinstance(k, str) and k.isascii() and k.isdigit():
                token = int(k)
            if token is None:
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {k!r}")
            bias[token] = float(_number(v, f"logit_bias[{k}]", -100, 100))
        p.logit_bias = bias
    if isinstance(p.n, bool) or not isinstance(p.n, int) or not 1 <= p.n <= limits.n:
        raise InvalidRequestError(f"n must be an integer in [1, {limits.n}], got {p.n!r}")
    for name in ("skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
        _flag(getattr(p, name), name)
    if not p.spaces_between_special_tokens:
        raise InvalidRequestError(
            "spaces_between_special_tokens=false is not supported (this tokenizer puts no spaces there)"
        )
    if isinstance(p.stop_regex, str):
        p.stop_regex = [p.stop_regex]
    if (
        not isinstance(p.stop_regex, list)
        or len(p.stop_regex) > limits.stop_regex
        or not all(
            isinstance(r, str) and 0 < len(r) <= limits.stop_regex_chars for r in p.stop_regex
        )
    ):
        raise InvalidRequestError(
            f"stop_regex takes at most {limits.stop_regex} patterns of 1 to {limits.stop_regex_chars} characters"
        )
    for r in p.stop_regex:
        try:
            regex.compile(r)
        except regex.error as e:
            raise InvalidRequestError(f"stop_regex {r!r} is not a valid pattern: {e}") from None
