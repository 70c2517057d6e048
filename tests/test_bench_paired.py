"""bench_paired end to end on dummy:tiny: an exact policy pairs with full at agreement 1 and no KL, a small budget
does not; one row per policy."""

import json

from benchmarks import bench_paired


def test_exact_and_budgeted_policies_paired_with_full(tmp_path):
    out = tmp_path / "paired.json"
    rows = bench_paired.main(
        "--model dummy:tiny --device cpu --samples 2 --prompt-tokens 600 --forced-tokens 16 --top 20 "
        f"--chunk 256 --host-kv-gib 0.05 --kv-cache-gib 0.05 --base full "
        f"--policies offload,streaming::budget=64 --output {out}".split()
    )
    assert json.loads(out.read_text()) == rows
    exact, budgeted = rows
    assert (exact["policy"], budgeted["policy"], budgeted["options"]) == (
        "offload",
        "streaming",
        {"budget": 64},
    )
    assert exact["steps"] == budgeted["steps"] == 32 and exact["samples"] == 2
    assert exact["top1_agreement"] == 1.0 and exact["mean_abs_delta_logprob"] < 1e-4
    assert abs(exact["kl_top20"]) < 1e-4 and abs(exact["ppl"] - exact["ppl_base"]) < 1e-3
    assert budgeted["mean_abs_delta_logprob"] > 1e-3
