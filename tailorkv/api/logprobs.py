"""OpenAI's `logprobs` of a completion (tokens, token_logprobs, top_logprobs, text_offset) and of a chat message
(content[]: token, logprob, bytes, top_logprobs), built from the logprobs an engine Request kept."""

from __future__ import annotations

from collections.abc import Callable

from ..engine.request import Request

# (token id, its logprob or None for a prompt's first token, its top (id, logprob) pairs or None)
Entry = tuple[int, float | None, list[tuple[int, float]] | None]


def output_entries(req: Request, begin: int, end: int) -> list[Entry]:
    """The output tokens [begin, end) of `req` with their logprobs."""
    tops = req.output_top_logprobs[begin:end] or [None] * (end - begin)
    return list(zip(req.output_ids[begin:end], req.output_logprobs[begin:end], tops))


def prompt_entries(req: Request) -> list[Entry]:
    """The prompt tokens from req.logprob_start on, with their logprobs (the first token's is None)."""
    ids = req.input_ids[req.logprob_start or 0 :]
    return list(zip(ids, req.input_logprobs, req.input_top_logprobs))


def completion_logprobs(entries: list[Entry], text: Callable[[int], str], offset: int) -> dict:
    """Completions' logprobs; text_offset counts characters of the choice's text from `offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, logprob, top in entries:
        piece = text(token)
        out["tokens"].append(piece)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(None if top is None else {text(t): lp for t, lp in top})
        out["text_offset"].append(offset)
        offset += len(piece)
    return out


def chat_logprobs(entries: list[Entry], text: Callable[[int], str]) -> dict:
    def item(token: int, logprob: float) -> dict:
        piece = text(token)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    return {
        "content": [
            {**item(token, logprob), "top_logprobs": [item(t, lp) for t, lp in top or ()]}
            for token, logprob, top in entries
        ]
    }
