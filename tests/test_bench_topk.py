"""The two-stage top-k (kvcache/selection.py) equals torch.topk (values exactly; indices where values are distinct)
at sizes off the chunk and on it, k times a chunk below and above the row's length, -inf padding and masked runs
included, every index inside the row; the script writes its rows on CPU."""

import json

import pytest
import torch

from benchmarks import bench_topk
from tailorkv.kvcache.selection import two_stage_topk


# k * chunk below n (two stages; n off the chunk or on it) and at or above it (torch.topk itself)
@pytest.mark.parametrize(
    "n,k,chunk",
    [(1000, 7, 64), (4097, 12, 64), (20480, 128, 16), (300, 100, 64), (50, 10, 64), (1000, 60, 64)],
)
def test_two_stage_topk_equals_torch_topk(n, k, chunk):
    scores = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(n))
    scores[0, 1, : n // 2] = float("-inf")  # masked positions, as select_tokens leaves them
    scores[1, 2, 30:] = float("-inf")  # fewer finite scores than k: -inf picks, padding among them
    got, expect = two_stage_topk(scores, k, chunk), scores.topk(k, dim=-1)
    assert torch.equal(got[0], expect.values)
    finite = expect.values > float("-inf")
    assert torch.equal(got[1][finite], expect.indices[finite])
    assert torch.equal(scores.gather(-1, got[1]), got[0])


def test_script_writes_rows_on_cpu(tmp_path):
    out = tmp_path / "topk.json"
    bench_topk.main(
        [
            "--device=cpu",
            "--contexts=5000",
            "--batch=1",
            "--k=16",
            "--chunk=1024",
            "--warmup=1",
            "--repeats=2",
            f"--output={out}",
        ]
    )
    (row,) = json.loads(out.read_text())
    assert (
        row["context"] == 5000
        and min(row[f"{x}_ms"] for x in ("torch", "two_stage", "positions")) > 0
    )
    assert {"machine", "date", "commit", "command"} <= set(row)


def test_the_radix_select_is_timed_at_other_programs_a_pass_and_left_as_it_was():
    from tailorkv.kernels import token_topk_triton

    default = token_topk_triton._TARGET_PROGRAMS
    assert bench_topk.with_programs(2048, lambda: token_topk_triton._TARGET_PROGRAMS) == 2048
    assert token_topk_triton._TARGET_PROGRAMS == default
    with pytest.raises(ZeroDivisionError):
        bench_topk.with_programs(7, lambda: 1 / 0)
    assert token_topk_triton._TARGET_PROGRAMS == default
