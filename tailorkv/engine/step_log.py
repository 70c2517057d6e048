"""SGLang-style progress lines: one for each step that prefills (new and cached prompt tokens, its time), one every
`interval` decode-only steps (running requests, generation throughput). Logged at INFO on `tailorkv.engine`; a
warning when the CUDA caching allocator had to free its cache and retry during a step (seconds lost near the card's
memory limit)."""

from __future__ import annotations

import logging

log = logging.getLogger("tailorkv.engine")


class StepLog:
    def __init__(self, interval: int = 40):
        self.interval = interval
        self.decode_steps = self.decode_tokens = 0
        self.decode_seconds = 0.0
        self.prefill_seconds = 0.0  # the last step that prefilled
        # the last step's prompt chunks: (new tokens, tokens before them) of each prefill row
        self.chunks: list[tuple[int, int]] = []
        self.alloc_retries = 0
        self.overlapped_steps = (
            0  # decode steps launched before the tokens of the step before had landed
        )

    def allocator(self, retries: int) -> None:
        """`retries`: the allocator's num_alloc_retries so far (torch.cuda memory stats)."""
        if retries > self.alloc_retries:
            log.warning(
                "the CUDA allocator ran out of memory and retried %d times in this step (each retry frees "
                "its cache and syncs the device)",
                retries - self.alloc_retries,
            )
        self.alloc_retries = retries

    def record(
        self,
        chunks: list[tuple[int, int]],
        prefill: list[tuple[int, int]],
        decoding: int,
        seconds: float,
    ) -> None:
        """`chunks`: (new tokens, tokens before them) of each row computing its prompt; `prefill`: (new tokens,
        cached tokens) of each; `decoding`: rows decoding."""
        self.chunks = chunks
        if prefill:
            self.prefill_seconds = seconds
            log.info(
                "prefill: %d seqs, %d new tokens, %d cached tokens, %d decoding, %.1f ms",
                len(prefill),
                sum(n for n, _ in prefill),
                sum(c for _, c in prefill),
                decoding,
                seconds * 1e3,
            )
            return
        self.decode_steps += 1
        self.decode_tokens += decoding
        self.decode_seconds += seconds
        if self.decode_steps == self.interval:
            log.info(
                "decode: %d running, %.1f ms/step, %.1f tok/s",
                decoding,
                self.decode_seconds / self.decode_steps * 1e3,
                self.decode_tokens / self.decode_seconds,
            )
            self.decode_steps = self.decode_tokens = 0
            self.decode_seconds = 0.0
