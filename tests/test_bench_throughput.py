"""bench_throughput: the batch search (doubling, then bisecting to the size after the largest that fits), presets
pinned, and the script end to end on CPU: a real server on dummy:tiny whose KV budget holds one request."""

import argparse
import json

from conftest import free_port

from benchmarks import bench_throughput


def _search(limit: int, start: int, cap: int, estimate: int | None = None) -> list[int]:
    probed = []

    def fits(b: int) -> bool:
        probed.append(b)
        return b <= limit

    bench_throughput.search(fits, start, cap, estimate)
    return probed


def test_search_ends_on_the_size_after_the_largest_that_fits():
    assert _search(5, 1, 64) == [1, 2, 4, 8, 6, 5]
    assert _search(4, 1, 64) == [1, 2, 4, 8, 6, 5]
    assert _search(1, 1, 64) == [1, 2]
    assert _search(0, 1, 64) == [1]
    assert _search(100, 1, 12) == [1, 2, 4, 8, 12]  # the cap fits: nothing larger is probed
    assert _search(9, 1, 12) == [1, 2, 4, 8, 12, 10, 9]


def test_search_from_an_estimate_probes_it_and_the_next_size_first():
    assert _search(5, 1, 64, estimate=5) == [5, 6]  # right: two probes
    assert _search(5, 1, 64, estimate=7) == [7, 3, 5, 6]  # too high: bisect below it
    assert _search(5, 1, 64, estimate=4) == [4, 5, 10, 7, 6]  # too low: double on from it
    assert _search(100, 1, 12, estimate=20) == [12]  # the cap fits
    assert _search(0, 1, 64, estimate=3) == [3, 1]


def test_presets_are_pinned():
    assert bench_throughput.pinned("tailor") == "tailor:longbench"
    assert bench_throughput.pinned("tailor::key_sketch=1") == "tailor:longbench:key_sketch=1"
    assert bench_throughput.pinned("tailor:ruler") == "tailor:ruler"
    assert bench_throughput.pinned("full") == "full"
    spec = bench_throughput.pinned("tailor::host_kv_dtype=fp8")
    assert spec == "tailor:longbench:host_kv_dtype=fp8"
    args = argparse.Namespace(
        model="m", port=1, max_batch=4, contexts=[300], server_args="--device cpu", tp_size=2
    )
    cmd = " ".join(bench_throughput.server_command(args, spec))
    assert "--tp 2 --tailor-preset longbench --host-kv-dtype fp8 --device cpu" in cmd
    # an engine setting in a spec: its flag (a switch alone, left out when false)
    cmd = bench_throughput.server_command(args, "full::overlap_schedule=true:step_budget_ms=50")
    assert cmd[-5:] == ["--enable-overlap-schedule", "--step-budget-ms", "50", "--device", "cpu"]
    assert "--disable-overlap-schedule" in bench_throughput.server_command(
        args, "full::overlap_schedule=false"
    )


def test_script_finds_the_largest_batch_on_cpu(tmp_path):
    out = tmp_path / "throughput.json"
    pages = 24  # of 16 tokens x 4 layers x 2 KV heads x 32 x K and V in float32: 1 request of 300 tokens
    rows = bench_throughput.main(
        [
            "--model=dummy:tiny",
            "--policies=full",
            "--contexts=300",
            "--output-len=8",
            "--max-batch=4",
            f"--port={free_port()}",
            f"--server-args=--device cpu --kv-cache-gib {pages * 32 / 2**20} --host-kv-gib 0.01",
            f"--output={out}",
        ]
    )
    assert [(r["batch"], r["fits"], r.get("largest")) for r in rows] == [
        (1, True, True),
        (2, False, None),
    ]
    assert rows[0]["decode_tok_per_s"] > 0 and rows[0]["output_tok_per_s"] > 0
    assert rows[1]["peak_running"] == 1 and rows[1]["decode_tok_per_s"] is None
    # the server's chunk-sizing model after each probe (none on CPU)
    assert all("step_cost" in r for r in rows)
    assert json.loads(out.read_text()) == rows
    assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    # a GPU host without matplotlib: the plot drawn later from the rows it wrote
    again = tmp_path / "again.png"
    assert bench_throughput.main([f"--plot-rows={out}", f"--plot={again}"]) == []
    assert again.read_bytes()[:4] == b"\x89PNG"


def test_largest_after_a_search_or_only_beside_a_failed_next_size():
    rows = [{"batch": b, "fits": f} for b, f in [(4, True), (8, False), (6, True), (7, False)]]
    assert bench_throughput.largest(rows, exact=False)["batch"] == 6
    assert bench_throughput.largest(rows, exact=True)["batch"] == 6  # 7 did not fit
    # 5 never probed: not known to be largest
    assert bench_throughput.largest(rows[:1], exact=True) is None
    assert bench_throughput.largest(rows[:1], exact=False)["batch"] == 4
    assert bench_throughput.largest([{"batch": 3, "fits": False}], exact=False) is None
