"""A step's state lives in the StepState that its policy's `prepare` builds before the layers run, never on the
policy: serving requests leaves every attribute of the policy bound to what it was bound to at start."""

import pytest

from tailorkv import Engine

PROMPTS = ["The capital of France is", "Once upon a time, in a small village, there lived"]


@pytest.mark.parametrize("policy", ["full", "tailor", "kivi", "offload", "streaming", "quest"])
def test_steps_bind_no_attribute_of_the_policy(policy):
    with Engine(progress=False, kv_policy=policy) as e:
        before = dict(vars(e.policy))
        outs = e.generate(PROMPTS, sampling_params={"max_new_tokens": 3, "temperature": 0})
        assert [len(o["output_ids"]) for o in outs] == [3, 3]
        after = vars(e.policy)
        assert after.keys() == before.keys()
        assert [name for name, value in before.items() if after[name] is not value] == []
