"""bench_q_attention at a small shape (on CPU the Triton kernel in the interpreter, on a GPU compiled): a row per
setting, the fastest marked per context, batch and bits, and a setting whose output differs from the first's is an
error, not a row."""

import json

import pytest
import torch
from triton_kernels import DEVICE

from benchmarks import bench_q_attention
from tailorkv.kernels import kivi_triton

ARGS = [f"--device={DEVICE}", "--contexts=300", "--batch=2", "--bits=1,2", "--heads=6,2,64"]
ARGS += ["--programs=1,8", "--warps=4", "--stages=1", "--warmup=0", "--repeats=1"]


def test_script_sweeps_the_settings_and_marks_the_fastest(tmp_path):
    out = tmp_path / "q.json"
    rows = bench_q_attention.main(ARGS + [f"--output={out}"])
    assert json.loads(out.read_text()) == rows
    assert [(r["bits"], r["target_programs"]) for r in rows] == [(1, 1), (1, 8), (2, 1), (2, 8)]
    assert [r["splits"] for r in rows] == [1, 2, 1, 2]  # 5 pages over 4 (row, KV head) pairs
    for bits in (1, 2):
        group = [r for r in rows if r["bits"] == bits]
        assert sum(r["best"] for r in group) == 1
        assert next(r for r in group if r["best"])["us"] == min(r["us"] for r in group)


def test_share_q_pages_launch_for_rows_alone_splits_per_group(tmp_path):
    """--share 4: every row alone in share_q_pages' launch; the splits count one program per group of up to 4 rows
    (2 rows: one group, so 2 pairs and 8 // 2 programs a pair where no groups give 8 // 4), the output the same."""
    args = [a for a in ARGS if not a.startswith(("--bits", "--programs"))]
    rows = bench_q_attention.main(
        args + ["--bits=2", "--programs=8", "--share=0,4", f"--output={tmp_path / 'q.json'}"]
    )
    assert [(r["share"], r["splits"]) for r in rows] == [(0, 2), (4, 3)]


def test_half_page_tiles_and_the_default_split_are_settings_with_the_same_output(tmp_path):
    args = [a for a in ARGS if not a.startswith(("--bits", "--programs"))]
    rows = bench_q_attention.main(
        args
        + [
            "--bits=2",
            "--programs=8,0",
            "--tiles=32",
            f"--output={tmp_path / 'q.json'}",
        ]
    )
    assert [(r["tile"], r["target_programs"]) for r in rows] == [(32, 8), (32, 0)]


def test_a_tile_that_splits_a_word_is_refused():
    inputs = bench_q_attention.case(300, 1, 1, 6, 2, 64, DEVICE, torch.float32)
    with pytest.raises(ValueError, match="tile 16"):
        kivi_triton.paged_decode_attention(*inputs, tile=16)  # 1-bit words hold 32 tokens


def test_a_setting_that_changes_the_output_is_an_error(tmp_path, monkeypatch):
    attend = kivi_triton.paged_decode_attention

    def wrong(*args, target_programs, **knobs):
        out = attend(*args, target_programs=target_programs, **knobs)
        return out + 0.1 if target_programs == 8 else out

    monkeypatch.setattr(kivi_triton, "paged_decode_attention", wrong)
    with pytest.raises(AssertionError, match="target_programs': 8"):
        bench_q_attention.main(ARGS + [f"--output={tmp_path / 'q.json'}"])
    assert not (tmp_path / "q.json").exists()
