"""The server's warm-up before serving runs each kind of step once and leaves nothing behind."""

from tailorkv import Engine
from tailorkv.engine.warm_up import warm_up


def test_warm_up_runs_each_kind_of_step_and_leaves_nothing():
    with Engine(kv_policy="tailor", progress=False) as e:
        steps = []  # (prefill rows' cached tokens, decoding rows)
        record = e.step_log.record

        def recording(chunks, prefill, decoding, seconds):
            steps.append(([c for _, c in prefill], decoding))
            record(chunks, prefill, decoding, seconds)

        e.step_log.record = recording
        warm_up(e)
        assert steps[0] == ([0], 0)  # the first prompt alone
        assert (
            steps[1][1] == 1 and steps[1][0][0] >= 256
        )  # after the shared block, beside the first's decode
        assert ([], 2) in steps  # both decode
        assert not e.requests and not e.memory.held
        assert all(t["free_pages"] == t["total_pages"] for t in e.memory.usage().values())
