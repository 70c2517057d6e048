"""benchmarks.bench_prefix_prefill runs end to end (on a tiny dummy model with a plan of one Q layer: no weights to
load): the later rows reuse the whole document, from GPU copies by default and from the host tier without."""

import json

from benchmarks import bench_prefix_prefill
from tailorkv.kvcache.plans import save_plan


def test_bench_prefix_prefill_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    save_plan(
        "dummy:tiny", [0], [], 0.2, None
    )  # layers 1-3 sparse: their prompt rows are shared blocks
    out = tmp_path / "prefix_prefill.json"
    rows = bench_prefix_prefill.main(
        [
            "--model",
            "dummy:tiny",
            "--doc-tokens",
            "600",
            "--new-tokens",
            "20",
            "--rows",
            "1,2",
            "--repeats",
            "1",
            "--kv-cache-gib",
            "0.25",
            "--host-kv-gib",
            "1",
            "--output",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == rows
    assert [(r["copies"], r["rows"]) for r in rows] == [
        ("auto", 1),
        ("auto", 2),
        (0.0, 1),
        (0.0, 2),
    ]
    # the whole document: two full 256-token blocks and 88 tokens of the first prompt's partial block
    assert all(r["cached_tokens"] == 600 and r["step_ms"] > 0 for r in rows)
    assert rows[0]["copy_pages"] > 0 and rows[2]["copy_pages"] == 0
