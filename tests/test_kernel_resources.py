"""benchmarks/kernel_resources.py: a pytest selection's kernel launches, recorded in the interpreter as the JIT
specializes them, compiled for sm_90 without a GPU. The rows-kept fetch at float32 rows 128 wide (512 bytes, 16-byte
aligned) loads its rows in 16-byte vectors without spilling: the alignment hint its address select needs."""

from benchmarks import kernel_resources

KEPT = "tests/test_host_copy.py::test_gather_rows_reads_rows_kept_from_the_last_step_there"


def test_the_kept_rows_fetch_compiles_for_sm90_to_vector_loads_without_spills(tmp_path):
    rows = kernel_resources.main(
        [f"{KEPT}[2-7-3-64-128-45-24-False-dtype0]", f"--output={tmp_path}/k.json"]
    )
    (row,) = rows
    assert row["kernel"] == "_gather_rows_kernel" and row["constexprs"]["REUSE"] is True
    assert row["constexprs"]["ALIGNED"] is True and row["num_warps"] == 4
    assert 0 < row["registers"] <= 255 and row["stack_bytes"] == 0
    assert row["loads"][".v4"] > 0  # 16-byte loads of the rows
    assert (tmp_path / "k.json").exists()
