"""Before serving: a fresh process compiles Triton kernels at their first launch, in the middle of the first
requests' steps (1.5 s for the first prefill beside an eager decode on an H100). `warm_up` runs two short
requests so that each kind of step has run once: a prefill alone, a prefill after a shared prefix beside an
eager decode, then decodes of both. The kernels compile one variant for any lengths, so these are the ones
long prompts use too."""

from __future__ import annotations

from .sampling import SamplingParams

PROMPT_TOKENS = (
    300  # more than one prefix block (256 tokens for tailor): the second request shares the first's
)


def warm_up(engine, new_tokens: int = 4) -> None:
    vocab = engine.config.vocab_size
    n = min(PROMPT_TOKENS, engine.config.max_position // 2 - new_tokens)
    first = [(i * 7919) % vocab for i in range(1, n + 1)]
    second = first[: n - n // 8] + [(i * 104729) % vocab for i in range(n // 8)]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    engine.add_request(first, params)
    engine.step()  # the first prompt, alone
    engine.add_request(second, params)
    while engine.has_work:  # with the overlap schedule, until its last step has landed
        engine.step()  # the second after the shared prefix beside the first's decode, then both decode
