"""Recorded outputs of the embedded model: greedy for every KV policy, and seeded sampling.

Refactors must keep them byte-identical. `python -m tests.test_golden --record` rewrites the file (only when an
output is meant to change, and say why in the commit).
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

GOLDEN = pathlib.Path(__file__).parent / "data" / "golden.json"
NEW_TOKENS = 24
# policy name -> Engine options; the essay prompt is longer than tailor's sink + recent + top_k, so the
# sparse and quantized paths all decide what is read
POLICIES = {
    "full": {},
    "tailor": {
        "kv_policy": "tailor",
        "tailor_preset": "longbench",
    },  # the recorded preset (auto: test_budget)
    "tailor-sketch0": {"kv_policy": "tailor", "tailor_preset": "longbench", "key_sketch": 0},
    "kivi": {"kv_policy": "kivi"},
    "offload": {"kv_policy": "offload"},
    "streaming": {"kv_policy": "streaming"},
    "quest": {"kv_policy": "quest"},
}
SAMPLED = [
    {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 1234},
    {"temperature": 1.3, "min_p": 0.05, "seed": 7},
]


def prompts() -> list[str]:
    from tailorkv.essays import load_essays

    # 348 tokens: 1.8x tailor's budget; every policy answers it for most of its 24 tokens
    essay = " ".join(load_essays().split(" ")[:260])
    return [
        "The capital of France is",
        "Once upon a time, in a small village,",
        essay + "\n\nIn one sentence, the essay above says that",
    ]


def outputs(policy: str) -> list[dict]:
    from tailorkv.engine.engine import Engine

    with Engine(progress=False, kv_cache_gib=0.25, host_kv_gib=0.25, **POLICIES[policy]) as engine:
        greedy = {"max_new_tokens": NEW_TOKENS, "temperature": 0}
        outs = engine.generate(prompts(), sampling_params=greedy)
        if policy == "full":
            sp = [{"max_new_tokens": NEW_TOKENS, **s} for s in SAMPLED]
            outs += engine.generate(prompts()[:2], sampling_params=sp)
    return [{"text": o["text"], "output_ids": o["output_ids"]} for o in outs]


@pytest.mark.parametrize("policy", list(POLICIES))
def test_outputs_equal_the_recorded_ones(policy):
    assert outputs(policy) == json.loads(GOLDEN.read_text())[policy]


if __name__ == "__main__" and "--record" in sys.argv:
    GOLDEN.write_text(json.dumps({p: outputs(p) for p in POLICIES}, indent=1) + "\n")
