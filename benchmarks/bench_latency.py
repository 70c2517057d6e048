"""Decode latency per KV policy at long contexts: ms/token, prefill time, memory, and the physical floor.

    python -m benchmarks.bench_latency --model dummy:llama-3.1-8b --contexts 32768,131072 \
        --policies full,tailor:longbench,tailor:longbench:key_sketch=1,kivi,offload --steps 32 --device cuda

For each policy (one engine, reused across contexts) and context: --batch random prompts of that many tokens,
prefilled a prompt a step (--chunked-prefill-size, no step-time budget), `--warmup` decode steps, then `--steps`
timed decode steps (median). GPU/host KV bytes are what the requests hold in each tier, a page several requests share
once (`--shared-prefix`: the prompts begin with the same document, as doc chat's users do). The floor is the time to
move the bytes a step must move at bandwidths measured at the start of the same run on the same device
(bandwidth.py): weights and GPU-resident KV at the device-copy rate, bulk PCIe reads (stage 1 channel runs, the
offload baseline's whole KV) at the pinned host-to-device copy rate, and the top-k rows at the UVA gather rate (at
the policy's host row layout, fp8 rows included), except the share of them on pages with a GPU copy (tailor's
DeviceCopies, `copied_share`) or kept from the step before (`reuse_rows`, `reused_share`: measured on one step
after the timed ones), counted at the device rate. Comparing `tailor:longbench` with
`tailor:longbench:prefix_gpu_gib=0` (no copies) shows what reading copies gains.
Writes rows {policy, preset, context, batch, shared_prefix, shared_cached_tokens, gpu_memory_limit_gib,
ms_per_token, prefill_s, peak_gpu_bytes, gpu_kv_bytes, host_kv_bytes, copied_share, reused_share, chunked_prefill_size,
floor_ms,
floor_weights_ms, floor_gpu_kv_ms, floor_pcie_bulk_ms, floor_pcie_rows_ms, device_gb_per_s, host_copy_gb_per_s,
row_gather_gb_per_s, machine, date, commit, command} to --output; with
--profile-steps on CUDA also step_ms_by_part, a profiled step's device time by part (GEMMs, the top-k fetch, the
sparse attention, the key sketch, the Q layers, top-k, FlashInfer, copies, other); with --turn-tokens also
turn_tokens, turn_steps, turn_ms (doc chat's next turn prefilling beside the decoding rows) and turn_ms_by_part.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch

from benchmarks.bandwidth import Bandwidths
from benchmarks.bandwidth import measure as measure_bandwidths
from benchmarks.policy_spec import add_tp_argument, engine_options, identity
from benchmarks.rows import run_info, write_rows
from tailorkv import Engine, SamplingParams
from tailorkv.kvcache.offload_store import HOST_PAGE, OffloadStore


def sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def held_bytes(engine: Engine, rids: list[int]) -> dict[str, int]:
    """The bytes of the pages the requests hold in each tier, a page that several share (a cached document) once."""
    pages: dict[str, set] = {}
    for rid in rids:
        for pool, held in engine.memory.held.get(rid, {}).items():
            pages.setdefault(pool, set()).update(held)
    out = {"gpu": 0, "host": 0}
    for pool, held in pages.items():
        spec = engine.memory.specs[pool]
        out[spec.tier] += len(held) * spec.bytes_per_page
    return out


def host_rows(engine: Engine) -> tuple[tuple[int, int, int], torch.dtype]:
    """The layout of a host page's token rows [tokens, heads, width] and their dtype (what the top-k gathers)."""
    store = getattr(engine.policy, "offload", None)
    if store is not None:
        return store.row_shape, store.row_dtype
    c = engine.config
    return (256, c.num_kv_heads, 2 * c.head_dim), engine.dtype


def copied_share(engine: Engine, rids: list[int]) -> float:
    """Of the requests' host pages, the share whose rows a decode step's fetch reads from a GPU copy (tailor)."""
    store = getattr(engine.policy, "offload", None)
    if store is None or store.decode_copies is None:
        return 0.0
    pages = torch.cat([engine.policy.s_state[rid].host_pages_cpu for rid in rids])
    return (store.copies.readable(pages) >= 0).float().mean().item() if pages.numel() else 0.0


def reused_share(engine: Engine) -> float:
    """Of the top-k rows one more decode step fetches (tailor with reuse_rows), the share the step before kept on
    the GPU: the positions this step keeps against those it found kept. Exact where reuse_rows >= top_k; else the
    share among each selection's first reuse_rows rows."""
    store = getattr(engine.policy, "offload", None)
    if store is None or store.kept_pos is None:
        return 0.0
    before = store.kept_pos.clone()
    engine.step()
    hits = kept = 0
    for now, was in zip(store.kept_pos, before):  # a layer at a time: [slots, heads, reuse_rows]
        valid = now >= 0
        hits += ((now[..., :, None] == was[..., None, :]).any(-1) & valid).sum().item()
        kept += valid.sum().item()
    return hits / kept if kept else 0.0


def floor_parts(
    engine: Engine,
    context: int,
    batch: int,
    gpu_kv: int,
    bw: Bandwidths,
    copied: float = 0.0,
    shared: int = 0,
    reused: float = 0.0,
) -> dict[str, float]:
    """Milliseconds to move what one decode step must move, by part: the weights once, the GPU-resident KV the
    batch reads (of tailor's key sketch only the d_s channels a row scores: its pages are channel-major), bulk
    PCIe reads (stage 1's channels, the offload baseline's whole KV), the top-k rows (the `copied` share of them
    from GPU copies and the `reused` share of the others from the rows the step before kept, in the GPU KV part
    with the rows kept for the next step). `shared`: the leading prompt tokens every row shares (their pages, as
    `gpu_kv` counts them, read once)."""
    c, item = engine.config, engine.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    kv_token = 2 * c.num_kv_heads * c.head_dim * item  # one layer, one token, K and V
    parts = {"weights": weights / bw.device, "gpu_kv": 0.0, "pcie_bulk": 0.0, "pcie_rows": 0.0}
    if engine.kv_policy == "offload":
        parts["pcie_bulk"] = batch * context * c.num_layers * kv_token / bw.host_copy
    elif engine.kv_policy == "tailor":
        t, ns = engine.policy.tc, len(engine.policy.s_index)
        # d_s channels of K for every prompt token, unless the key sketch (in gpu_kv) replaces them
        stage1 = 0 if t.key_sketch else ns * c.num_kv_heads * t.d_s * context * item
        (_, h, w), dtype = host_rows(engine)
        row = (
            h * w * torch.empty(0, dtype=dtype).element_size()
        )  # one token's rows of every KV head
        rows = batch * ns * t.top_k * row
        shared_pages = shared // HOST_PAGE
        sketch = (
            batch * (-(-context // HOST_PAGE) - shared_pages) + shared_pages
        ) * OffloadStore.bytes_per_sketch_page(ns, c.num_kv_heads, c.head_dim, t.key_sketch)
        unread = sketch * (1 - t.d_s / c.head_dim) if t.key_sketch else 0
        from_host = (1 - copied) * (1 - reused)
        keep = (
            batch * ns * min(t.reuse_rows, t.top_k) * row
        )  # the rows written back for the next step
        parts["gpu_kv"] = (gpu_kv - unread + (1 - from_host) * rows + keep) / bw.device
        parts["pcie_bulk"] = batch * stage1 / bw.host_copy
        parts["pcie_rows"] = from_host * rows / bw.row_gather
    else:  # full, kivi: everything the request holds on the GPU is read
        parts["gpu_kv"] = gpu_kv / bw.device
    return {k: 1e3 * v for k, v in parts.items()}


def measure(engine: Engine, context: int, args) -> dict:
    gen = torch.Generator().manual_seed(context)
    reqs = []
    # the first prompts decode while the later ones prefill: about a step for each later one, four to be safe
    new = (
        args.warmup
        + args.steps
        + args.profile_steps
        + 3  # with reused_share's step
        + 4 * args.batch
        + 2 * (TURNS + 1) * bool(args.turn_tokens)
    )
    # prompt + generated tokens fill `context` (128k fits a 131072-token model); the first shared_prefix tokens the
    # same in every prompt
    doc = torch.randint(100, 40000, (min(args.shared_prefix, context - new),), generator=gen)
    prompts = [
        doc.tolist()
        + torch.randint(100, 40000, (context - new - len(doc),), generator=gen).tolist()
        for _ in range(args.batch)
    ]
    sp = SamplingParams.from_any({"max_new_tokens": new, "temperature": 0, "ignore_eos": True})
    # before any prefill (a batch of 50 x 32k took 4.5 minutes of a GPU call to find that it did not fit): the pools
    # hold this many such requests whole; a shared document is held once, which this count does not see
    if not len(doc) and args.batch > (holds := engine.scheduler.max_requests(context - new, new)):
        raise RuntimeError(
            f"{args.batch} requests of {context} tokens do not fit this engine's KV memory together: "
            f"its pools hold {holds}"
        )
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(engine)
    t0 = time.perf_counter()
    # a shared document is prefilled once: the first prompt alone, then the others find it in the prefix cache
    waves = [prompts[:1], prompts[1:]] if len(doc) else [prompts]
    for wave in waves:
        reqs += [engine.add_request(ids, sp) for ids in wave]
        while any(r.seq.prefilling for r in reqs):
            engine.step()
            # a finished request while later ones wait to prefill: fewer than --batch fit together, or the prompts'
            # chunks took more steps than the answers' tokens
            if any(r.finished for r in reqs):
                raise RuntimeError(
                    f"a request finished its {new}-token answer before the last of {args.batch} prompts of {context} "
                    f"tokens prefilled: fewer fit this engine's KV memory together, or their chunks "
                    f"(--chunked-prefill-size {engine.options.chunked_prefill_size}) took more steps than that"
                )
    sync(engine)
    prefill = time.perf_counter() - t0
    held = held_bytes(engine, [r.rid for r in reqs])
    # the prompt tokens the later requests read from the prefix cache (the document, to its last whole page)
    cached = min((r.seq.cached_tokens for r in reqs[1:]), default=0)
    copied = copied_share(engine, [r.rid for r in reqs])
    times = []
    for i in range(args.warmup + args.steps):
        # no sync of its own: a step returns once its tokens are on the host, or with the overlap schedule once the
        # step before's are (the launch interval)
        t = time.perf_counter()
        engine.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    reused = reused_share(engine)
    step_ms = profile(engine, context, args) if args.profile_steps else {}
    if any(r.finished for r in reqs):  # then the timed steps decoded fewer rows than --batch
        raise RuntimeError("a request finished its answer before the timed steps ended")
    turn = turn_steps(engine, doc, context, args, gen) if args.turn_tokens and len(doc) else {}
    if turn and any(r.finished for r in reqs):  # then the turns ran beside fewer rows than --batch
        raise RuntimeError("a request finished its answer before the turns ended")
    for r in reqs:
        engine.abort(r.rid)
    gpu_kv, host_kv = held["gpu"], held["host"]
    parts = floor_parts(
        engine, context, args.batch, gpu_kv, args.bandwidths, copied, cached, reused
    )
    return {
        **identity(args.current),
        "context": context,
        "batch": args.batch,
        "shared_prefix": args.shared_prefix,
        "shared_cached_tokens": cached,
        "gpu_memory_limit_gib": args.gpu_memory_limit,
        # the engine's schedule and compile in force (their defaults differ by device)
        "overlap_schedule": engine.options.overlap_schedule,
        "torch_compile": engine.options.enable_torch_compile,
        "chunked_prefill_size": engine.options.chunked_prefill_size,
        "ms_per_token": round(1e3 * statistics.median(times), 2),
        "prefill_s": round(prefill, 3),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated()
        if engine.device.type == "cuda"
        else None,
        "gpu_kv_bytes": gpu_kv,
        "host_kv_bytes": host_kv,
        "copied_share": round(copied, 3),
        "reused_share": round(reused, 3),
        "floor_ms": round(sum(parts.values()), 2),
        **{f"floor_{k}_ms": round(v, 3) for k, v in parts.items()},
        **args.bandwidths.as_row(),
        # a profiled step's device time by part (with --profile-steps, on CUDA)
        **({"step_ms_by_part": step_ms} if step_ms else {}),
        **turn,
    }


TURNS = 3  # doc chat turns timed (--turn-tokens), then one profiled


def turn_steps(engine: Engine, doc: torch.Tensor, context: int, args, gen: torch.Generator) -> dict:
    """Doc chat's next turn beside the decoding rows: a request of the document and --turn-tokens more (the
    document from the prefix cache) prefills in the steps it takes, each turn timed from its arrival to the end of
    its prefill (synchronized), then aborted; TURNS of them, then one profiled (with --profile-steps)."""
    sp = SamplingParams.from_any({"max_new_tokens": 2, "temperature": 0, "ignore_eos": True})

    def turn() -> int:
        req = engine.add_request(
            doc.tolist() + torch.randint(100, 40000, (args.turn_tokens,), generator=gen).tolist(),
            sp,
        )
        steps = 0
        while req.seq.prefilling:
            engine.step()
            steps += 1
        sync(engine)
        engine.abort(req.rid)
        return steps

    times, steps = [], 0
    for _ in range(TURNS):
        sync(engine)
        t = time.perf_counter()
        steps = turn()
        times.append(time.perf_counter() - t)
    row = {
        "turn_tokens": args.turn_tokens,
        "turn_steps": steps,
        "turn_ms": round(1e3 * statistics.median(times), 2),
    }
    if args.profile_steps:
        name = args.current.replace(":", "-").replace("=", "")
        path = f"{os.path.splitext(args.output)[0]}_{name}_{context}_turn.prof.txt"
        kernels = profiled(turn, path, engine.device.type == "cuda", rows=25)
        row["turn_ms_by_part"] = step_parts(kernels, 1)
    return row


# a profiled step's device time by part, the first that names a kernel (cuBLAS's GEMMs, our Triton kernels by name,
# torch's radix top-k, FlashInfer's attention); the rest is "other" (elementwise work, norms, indexing)
STEP_PARTS = (
    # first: FlashInfer's prefill kernels name cutlass types in their template arguments
    ("FlashInfer", ("flashinfer", "BatchDecode", "BatchPrefill", "SinglePrefill", "MergeState")),
    ("GEMMs", ("nvjet", "gemm", "splitKreduce", "cutlass")),
    ("top-k fetch", ("_gather_rows_kernel",)),
    ("sparse attention", ("_sparse_decode_kernel", "_merge_sparse_splits_kernel")),
    ("key sketch", ("_sketch_scores_kernel",)),
    ("Q layers", ("_paged_decode_kernel", "_merge_splits_kernel")),
    ("top-k", ("topk",)),
    ("copies", ("memcpy", "Memcpy", "_copy_pages_kernel")),
)


def step_parts(kernels: list[tuple[str, float]], steps: int) -> dict[str, float]:
    """Milliseconds a step of each part of STEP_PARTS that ran, and "other", from (kernel name, device
    microseconds) pairs of `steps` profiled steps: the short table of where a step's time goes."""
    out = dict.fromkeys([part for part, _ in STEP_PARTS] + ["other"], 0.0)
    for name, us in kernels:
        part = next((p for p, keys in STEP_PARTS if any(k in name for k in keys)), "other")
        out[part] += us / 1e3 / steps
    return {k: round(v, 3) for k, v in out.items() if v}


def profile(engine: Engine, context: int, args) -> dict[str, float]:
    """The per-kernel time breakdown of a few decode steps (torch.profiler), written beside the JSON rows; on CUDA,
    their device time a step by part (step_parts)."""
    name = args.current.replace(":", "-").replace("=", "")
    path = f"{os.path.splitext(args.output)[0]}_{name}_{context}.prof.txt"

    def steps():
        for _ in range(args.profile_steps):
            engine.step()
        sync(engine)

    kernels = profiled(steps, path, engine.device.type == "cuda", rows=25)
    return step_parts(kernels, args.profile_steps)


def profiled(run, path: str, cuda: bool, rows: int) -> list[tuple[str, float]]:
    """`run()` under torch.profiler, written to `path`: the device's time per kernel (on CUDA), then the host's
    per op (syncs, launches, Python work). Returns (name, device microseconds) of what ran on the device."""
    acts = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    )
    with torch.profiler.profile(activities=acts) as prof:
        run()
    key = "cuda_time_total" if cuda else "cpu_time_total"
    averages = prof.key_averages()
    with open(path, "w") as f:
        for by in dict.fromkeys((key, "cpu_time_total")):
            f.write(averages.table(sort_by=by, row_limit=rows, max_name_column_width=60) + "\n")
    device_us = [(e.key, getattr(e, "self_device_time_total", 0.0)) for e in averages]
    return [(k, us) for k, us in device_us if us > 0]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="dummy:llama-3.1-8b")
    p.add_argument("--policies", default="full,tailor:longbench,tailor:ruler,offload,kivi")
    p.add_argument("--contexts", default="16384,32768,65536,131072")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        metavar="TOKENS",
        help="the batch's prompts begin with the same TOKENS tokens (doc chat's document): the later ones read "
        "them from the prefix cache, full's decode through the cascade (full::cascade=0: a row at a time)",
    )
    p.add_argument(
        "--turn-tokens",
        type=int,
        default=0,
        metavar="TOKENS",
        help="with --shared-prefix: after the decode steps, time doc chat's next turn (the document and TOKENS "
        "more) prefilling beside the decoding rows (turn_ms; profiled with --profile-steps)",
    )
    p.add_argument(
        "--max-running",
        type=int,
        default=0,
        metavar="N",
        help="the engine's max running requests (default: the batch; a server's --max-running-requests pads a "
        "captured step to the next of its graph buckets)",
    )
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--device", default=None)
    p.add_argument("--gpu-memory-limit", type=float, default=None, metavar="GIB")
    p.add_argument("--kv-cache-gib", type=float, default=None)
    p.add_argument(
        "--chunked-prefill-size",
        type=int,
        default=None,
        help="prompt tokens a step (the engine's default)",
    )
    p.add_argument("--host-kv-gib", type=float, default=32.0)
    add_tp_argument(p)
    p.add_argument("--output", default="benchmarks/results/latency.json")
    p.add_argument(
        "--profile-steps", type=int, default=0, help="profile this many extra steps per row"
    )
    args = p.parse_args(argv)
    info = run_info(__spec__.name, argv)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)  # profiles go beside it
    contexts = [int(x) for x in args.contexts.split(",")]
    rows, measured = [], {}
    header = (
        f"{'policy':<30} {'context':>8} {'ms/token':>9} {'floor ms':>9} {'weights':>8} {'GPU KV':>7} "
        f"{'PCIe bulk':>9} {'PCIe rows':>9} {'prefill s':>9} {'peak GPU GiB':>12} {'GPU KV MiB':>10} "
        f"{'host KV MiB':>11} {'copied':>6} {'reused':>6}"
    )
    for spec in args.policies.split(","):
        args.current = spec
        name, opts = engine_options(spec)
        # --turn-tokens: a running slot for the turn beside the batch
        running = max(args.max_running, args.batch, 1) + bool(args.turn_tokens)
        engine = Engine(
            model=args.model,
            kv_policy=name,
            device=args.device,
            progress=False,
            max_running_requests=running,
            # a prompt a step, unlimited by the step-time budget (what is timed is decode). The whole batch in one
            # chunk (as here until 2026-12-05) reserved ~32 GiB of activations at 16 x 32k, which left tailor no
            # room for GPU copies of host pages
            chunked_prefill_size=args.chunked_prefill_size or max(contexts),
            step_budget_ms=0,
            kv_cache_gib=args.kv_cache_gib,
            host_kv_gib=args.host_kv_gib,
            gpu_memory_limit_gib=args.gpu_memory_limit,
            tp_size=args.tp_size,
            **opts,
        )
        layout = host_rows(engine)
        if layout not in measured:  # on this device, beside the engine, at its host row layout
            measured[layout] = measure_bandwidths(engine.device, *layout)
            print(
                f"bandwidths at host rows {tuple(layout[0])} {layout[1]}, GB/s: "
                + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in measured[layout]._asdict().items())
            )
            print(header, flush=True)
        args.bandwidths = measured[layout]
        for context in contexts:
            row = {**measure(engine, context, args), **info}
            rows.append(row)
            peak = (row["peak_gpu_bytes"] or 0) / 2**30
            print(
                f"{spec:<30} {context:>8} {row['ms_per_token']:>9.2f} {row['floor_ms']:>9.2f} "
                f"{row['floor_weights_ms']:>8.2f} {row['floor_gpu_kv_ms']:>7.2f} "
                f"{row['floor_pcie_bulk_ms']:>9.2f} {row['floor_pcie_rows_ms']:>9.2f} "
                f"{row['prefill_s']:>9.2f} {peak:>12.1f} {row['gpu_kv_bytes'] / 2**20:>10.0f} "
                f"{row['host_kv_bytes'] / 2**20:>11.0f} {row['copied_share']:>6.2f} {row['reused_share']:>6.2f}",
                flush=True,
            )
            if "step_ms_by_part" in row:
                parts = row["step_ms_by_part"]
                print(
                    f"  a profiled step, ms (the device busy {sum(parts.values()):.2f} of it): "
                    + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()),
                    flush=True,
                )
            if "turn_ms" in row:
                parts = row.get("turn_ms_by_part", {})
                print(
                    f"  the next turn ({row['turn_tokens']} tokens after the document): {row['turn_ms']} ms in "
                    f"{row['turn_steps']} step(s); profiled, device ms: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()),
                    flush=True,
                )
            write_rows(args.output, rows)
        engine.shutdown()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
