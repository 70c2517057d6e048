"""benchmarks.bench_cpu_linear times the embedded model's linear layers both ways and writes its rows."""

import json

import pytest
import torch

from benchmarks.bench_cpu_linear import main

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")


def test_script_times_both_ways_and_writes_rows(tmp_path):
    out = tmp_path / "rows.json"
    rows = main(["--batch", "1,2", "--repeats", "1", "--threads", "1", "--output", str(out)])
    assert [r["batch"] for r in rows] == [1, 2] and json.loads(out.read_text()) == rows
    for r in rows:
        assert r["mkl_ms"] > 0 and r["onednn_ms"] > 0
        assert r["speedup"] == pytest.approx(r["mkl_ms"] / r["onednn_ms"], rel=0.02)
        assert {"machine", "date", "commit", "command"} <= set(r)
