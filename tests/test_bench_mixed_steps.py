"""bench_mixed_steps on CPU: the long prompt's steps are all recorded, in order, and its gaps and TTFT measured."""

from benchmarks import bench_mixed_steps


def test_mixed_steps_records_each_step_of_the_long_prompt(tmp_path):
    out = tmp_path / "mixed.json"
    argv = f"--model dummy:tiny --users 2 --user-len 200 --long-len 700 --steps 2 --profile-at 300 --out {out}"
    (row,) = bench_mixed_steps.main(
        [
            *argv.split(),
            "--engine-args",
            '{"chunked_prefill_size": 256, "step_budget_ms": 1000, "device": "cpu"}',
        ]
    )
    # the step after 300 of the prompt's tokens (its third) profiled
    assert "aten::" in (tmp_path / "mixed.prof.txt").read_text()
    # a step's 256 tokens less one per decoding user
    for key, chunk in (("prefill_steps", 254), ("prefill_steps_alone", 256)):
        steps = row[key]
        assert [s["new"] for s in steps] == [chunk, chunk, 700 - 2 * chunk]
        assert [s["prefix"] for s in steps] == [0, chunk, 2 * chunk]
        assert all(s["s"] > 0 for s in steps)
    # beside the users the cost model was fitted by then (their prompts' steps); alone too
    assert all(s["predicted_s"] > 0 for s in row["prefill_steps"][1:])
    assert row["itl_s_max_during_prefill"] >= row["tpot_s_median"] > 0
    assert row["ttft_s"] > 0 and row["ttft_alone_s"] > 0
    assert (row["overlap_schedule"], row["torch_compile"]) == (False, False)  # CPU's defaults
    assert row["gpu_kv_gib"] == 2.0  # the CPU default GPU-tier budget, all of it in pools
    assert row["step_cost"]["budget_ms"] == 1000 and row["step_cost"]["decode_ms"] > 0


def test_mixed_steps_record_the_graphs_each_step_captured_and_ran_eagerly(tmp_path, monkeypatch):
    """With DecodeGraphs (its CPU stand-in), each step of the long prompt says what it captured and whether its
    decode rows ran eagerly: beside the prompt, none (shapes are captured ahead in the users' own steps)."""
    from test_graph_schedule import CpuGraphs

    from tailorkv.engine.engine import Engine

    class Graphed(Engine):
        def __enter__(self):
            self.runner.graphs = CpuGraphs(self, monkeypatch)
            return super().__enter__()

    monkeypatch.setattr(bench_mixed_steps, "Engine", Graphed)
    # the users cross 256 tokens (their Q layers' view: 4 pages to 8) while the long prompt prefills
    argv = f"--model dummy:tiny --users 2 --user-len 250 --long-len 700 --steps 2 --out {tmp_path / 'm.json'}"
    (row,) = bench_mixed_steps.main(
        [
            *argv.split(),
            "--engine-args",
            '{"chunked_prefill_size": 256, "step_budget_ms": 1000, "device": "cpu"}',
        ]
    )
    beside = row["prefill_steps"]
    assert len(beside) == 3 and all(s["captured"] == 0 and not s["eager_decode"] for s in beside)
    # alone: the prompt's steps have no decode rows
    assert all(s["captured"] == 0 and not s["eager_decode"] for s in row["prefill_steps_alone"])


def test_the_profilers_own_time_is_left_out_of_the_gaps_and_the_ttft(tmp_path, monkeypatch):
    """A profiler that takes 0.4 s to start and 0.4 s to write its table (the H100's took ~1.3 s) shows in
    `profile_s`, not in the users' longest gap or the long prompt's TTFT."""
    import time

    def slow_profiled(run, path, cuda, rows):
        time.sleep(0.4)
        run()
        time.sleep(0.4)

    monkeypatch.setattr(bench_mixed_steps, "profiled", slow_profiled)
    argv = "--model dummy:tiny --users 2 --user-len 200 --long-len 700 --steps 2 --profile-at 300"
    (row,) = bench_mixed_steps.main(
        [
            *argv.split(),
            "--engine-args",
            '{"chunked_prefill_size": 256, "step_budget_ms": 1000, "device": "cpu"}',
        ]
    )
    assert row["profile_s"] >= 0.8
    steps_s = sum(s["s"] for s in row["prefill_steps"])
    assert row["itl_s_max_during_prefill"] < 0.4 + max(s["s"] for s in row["prefill_steps"])
    assert steps_s <= row["ttft_s"] < steps_s + 0.4
