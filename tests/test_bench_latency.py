"""bench_latency's floor: bandwidths measured in the run (on CPU here, tiny sizes) and the floor's parts per policy,
the fp8 host tier's top-k rows costing their bytes; the script end to end on dummy:tiny."""

import json

import pytest
import torch

from benchmarks import bench_latency
from benchmarks.bandwidth import Bandwidths, measure
from tailorkv import Engine


def test_bandwidths_are_measured_on_the_device():
    bw = measure(torch.device("cpu"), (3, 256, 132), torch.uint8, mib=4)
    assert all(v > 0 for v in bw)
    assert set(bw.as_row()) == {"device_gb_per_s", "host_copy_gb_per_s", "row_gather_gb_per_s"}


@pytest.mark.parametrize("policy", ["tailor", "full"])
def test_floor_parts_count_what_a_step_moves(policy):
    bw = Bandwidths(1e12, 5e10, 2.5e10)
    parts = {}
    for dtype in ("auto", "fp8"):
        options = {"quant_layers": [0], "host_kv_dtype": dtype} if policy == "tailor" else {}
        if dtype == "fp8":  # 64 rows a layer, head and row kept for the next step
            options["reuse_rows"] = 64
        if policy == "full" and dtype == "fp8":
            continue
        with Engine(
            model="dummy:tiny",
            kv_policy=policy,
            progress=False,
            kv_cache_gib=0.02,
            host_kv_gib=0.02,
            **options,
        ) as e:
            parts[dtype] = bench_latency.floor_parts(e, 4096, 2, 10**6, bw)
            if dtype == "fp8":
                reused = bench_latency.floor_parts(e, 4096, 2, 10**6, bw, reused=0.5)
            if dtype == "auto":
                copied = bench_latency.floor_parts(e, 4096, 2, 10**6, bw, copied=0.75)
                # both rows share their 4,096 tokens: the sketch's pages are held and read once
                shared = bench_latency.floor_parts(e, 4096, 2, 10**6, bw, shared=4096)
            weights = sum(p.numel() * p.element_size() for p in e.model.parameters())
    auto = parts["auto"]
    assert auto["weights"] == pytest.approx(1e3 * weights / bw.device)
    # of the key sketch (2 rows x 16 pages of 3 S layers, 2 bits), a row reads the 8 channels of 32 it scores
    unread = (
        2 * 16 * 3 * 2 * 32 * (256 * 2 // 8 + 2 * 2 * 256 // 64) * (1 - 8 / 32)
        if policy == "tailor"
        else 0
    )
    assert auto["gpu_kv"] == pytest.approx(1e3 * (10**6 - unread) / bw.device)
    assert shared["gpu_kv"] == pytest.approx(1e3 * (10**6 - unread / 2) / bw.device)
    assert auto["pcie_bulk"] == 0  # the key sketch: no stage-1 reads over PCIe
    if policy == "full":
        assert auto["pcie_rows"] == 0
        return
    # 2 rows x 3 S layers x 128 top-k x 2 KV heads x (K and V: 2 x 32 float32 | fp8: 2 x 32 + 4 bytes)
    assert auto["pcie_rows"] == pytest.approx(1e3 * 2 * 3 * 128 * 2 * 256 / bw.row_gather)
    assert parts["fp8"]["pcie_rows"] == pytest.approx(auto["pcie_rows"] * 68 / 256)
    # rows on pages with a GPU copy move at the device rate
    rows = 2 * 3 * 128 * 2 * 256
    assert copied["pcie_rows"] == pytest.approx(auto["pcie_rows"] / 4)
    assert copied["gpu_kv"] == pytest.approx(1e3 * (10**6 - unread + 0.75 * rows) / bw.device)
    # fp8 rows kept for the next step are written at the device rate; those read from the step before's, read there
    fp8_rows = 2 * 3 * 128 * 2 * 68
    assert parts["fp8"]["gpu_kv"] == pytest.approx(auto["gpu_kv"] + 1e3 * fp8_rows / 2 / bw.device)
    assert reused["pcie_rows"] == pytest.approx(parts["fp8"]["pcie_rows"] / 2)
    assert reused["gpu_kv"] == pytest.approx(
        parts["fp8"]["gpu_kv"] + 1e3 * fp8_rows / 2 / bw.device
    )


def test_script_runs_on_cpu_and_prints_the_floor_parts(tmp_path, capsys):
    out = tmp_path / "latency.json"
    bench_latency.main(
        [
            "--model=dummy:tiny",
            "--policies=full,tailor:longbench,tailor:longbench:prefix_gpu_gib=0:reuse_rows=32:quant_layers=[0]",
            "--contexts=300",
            "--steps=1",
            "--warmup=0",
            "--device=cpu",
            "--kv-cache-gib=0.02",
            "--host-kv-gib=0.02",
            f"--output={out}",
        ]
    )
    row, copies, no_copies = json.loads(out.read_text())
    parts = [row[f"floor_{k}_ms"] for k in ("weights", "gpu_kv", "pcie_bulk", "pcie_rows")]
    assert row["floor_ms"] == pytest.approx(sum(parts), abs=0.01) and parts[0] > 0
    assert row["device_gb_per_s"] > 0 and row["ms_per_token"] > 0
    assert (row["overlap_schedule"], row["torch_compile"]) == (False, False)  # CPU's defaults
    # tailor's prompt pages got GPU copies as they were written (none where they are turned off)
    assert (row["copied_share"], copies["copied_share"], no_copies["copied_share"]) == (0, 1, 0)
    # without copies, some rows (not all) come from the rows the step before kept
    assert row["reused_share"] == copies["reused_share"] == 0 and 0 < no_copies["reused_share"] < 1
    assert "PCIe rows" in capsys.readouterr().out


def test_step_parts_sum_each_kernel_into_its_part_a_step():
    """Kernel names as an H200 profile has them; the first part that names a kernel takes it; 2 steps profiled."""
    kernels = [
        ("nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT", 8000.0),
        ("void cublasLt::splitKreduce_kernel<32, 16, int, float>", 400.0),
        ("_gather_rows_kernel", 2000.0),
        ("_sparse_decode_kernel", 600.0),
        ("_sketch_scores_kernel", 800.0),
        ("_paged_decode_kernel", 300.0),
        ("void at::native::mbtopk::computeBlockDigitCounts<float>", 1000.0),
        ("void at::native::sbtopk::gatherTopK<float>", 200.0),
        ("void flashinfer::BatchDecodeWithPagedKVCacheKernel<...>", 500.0),
        (
            "void flashinfer::PrefillWithKVCacheKernel<flashinfer::KernelTraits<cutlass::bfloat16_t>>",
            300.0,
        ),
        ("Memcpy HtoD (Pinned -> Device)", 100.0),
        ("void at::native::vectorized_elementwise_kernel<4>", 90.0),
    ]
    assert bench_latency.step_parts(kernels, 2) == {
        "GEMMs": 4.2,
        "top-k fetch": 1.0,
        "sparse attention": 0.3,
        "key sketch": 0.4,
        "Q layers": 0.15,
        "top-k": 0.6,
        "FlashInfer": 0.4,
        "copies": 0.05,
        "other": 0.045,
    }


def test_a_batch_whose_kv_does_not_fit_together_is_refused_not_measured_smaller(
    tmp_path, monkeypatch
):
    """On an H100 full's 16 x 32k (64 GiB of KV) held 4 requests at a time: the first finished while the rest waited,
    and the step was timed at the smaller batch. The script now refuses before it prefills anything, and says how
    many the pools hold."""
    args = ["--model=dummy:tiny", "--policies=full", "--contexts=300", "--steps=1", "--warmup=0"]
    args += [
        "--profile-steps=0",
        "--device=cpu",
        "--kv-cache-gib=0.001",
        f"--output={tmp_path / 'l.json'}",
    ]
    bench_latency.main([*args, "--batch=1"])  # one fits

    def step(self):
        raise AssertionError("a step ran")

    monkeypatch.setattr(bench_latency.Engine, "step", step)
    with pytest.raises(
        RuntimeError, match="3 requests of 300 tokens do not fit .*: its pools hold [12]$"
    ):
        bench_latency.main([*args, "--batch=3"])


def test_a_shared_document_is_prefilled_once_and_its_pages_counted_once(tmp_path):
    """--shared-prefix: the later prompts read the document from the prefix cache (all of its 512 tokens: whole
    pages), and the rows count its pages once, with the cascade and without it."""
    out = tmp_path / "shared.json"
    args = ["--model=dummy:tiny", "--contexts=700", "--batch=3", "--steps=1", "--warmup=0"]
    args += ["--device=cpu", "--kv-cache-gib=0.02", "--host-kv-gib=0.02", f"--output={out}"]
    bench_latency.main([*args, "--policies=full,full::cascade=0", "--shared-prefix=512"])
    cascade, rows = json.loads(out.read_text())
    bench_latency.main([*args, "--policies=full"])
    (alone,) = json.loads(out.read_text())
    assert (cascade["shared_cached_tokens"], rows["shared_cached_tokens"]) == (512, 512)
    assert alone["shared_prefix"] == alone["shared_cached_tokens"] == 0
    # two of the three prompts hold 512 tokens fewer of their own: K and V of 4 layers, 2 KV heads of 32, float32
    page_bytes = alone["gpu_kv_bytes"] - cascade["gpu_kv_bytes"]
    assert (
        page_bytes == 2 * 512 * 2 * 4 * 2 * 32 * 4
        and rows["gpu_kv_bytes"] == cascade["gpu_kv_bytes"]
    )


def test_the_next_turn_prefills_its_own_tokens_beside_the_decoding_rows(tmp_path, monkeypatch):
    """--turn-tokens: doc chat's next turn reads the document from the prefix cache and prefills only its own 40
    tokens (each turn in one step, beside the 3 decoding rows: until 2026-12-06 it waited for a 4th running slot
    until they finished), then leaves; the turn's profile is written."""
    prefilled = []
    add = Engine.add_request

    def add_request(self, ids, sp):
        req = add(self, ids, sp)
        prefilled.append(req)
        return req

    monkeypatch.setattr(Engine, "add_request", add_request)
    out = tmp_path / "turn.json"
    args = [
        "--model=dummy:tiny",
        "--contexts=700",
        "--batch=3",
        "--steps=1",
        "--warmup=0",
        "--profile-steps=1",
    ]
    args += ["--device=cpu", "--kv-cache-gib=0.02", "--host-kv-gib=0.02", f"--output={out}"]
    bench_latency.main(
        [*args, "--policies=tailor::quant_layers=[0]", "--shared-prefix=512", "--turn-tokens=40"]
    )
    (row,) = json.loads(out.read_text())
    turns = prefilled[3:]
    assert len(turns) == bench_latency.TURNS + 1 and all(r.finished for r in turns)
    assert [r.seq.cached_tokens for r in turns] == [512] * len(turns)
    assert row["turn_tokens"] == 40 and row["turn_steps"] == 1 and row["turn_ms"] > 0
    assert (tmp_path / "turn_tailor--quant_layers[0]_700_turn.prof.txt").exists()
