"""The top-k of a decode step's token scores ([rows, KV heads, context] float32, what select_tokens ranks per S
layer) by torch.topk, against an exact two-stage top-k: the k chunks of the context with the largest maxima, then
the top k of their positions; and against what select_tokens runs by default, token_topk's positions in position
order (on CUDA its Triton radix select: four histogram passes, a count and a write). torch.topk over a few long
rows runs multi-pass radix selection and a sort (~2 ms of tailor's 128k batch-1 step on the H100, 31 calls); the
two stages are short rows (tailor's `topk_chunk` option, kvcache/selection.py two_stage_topk).

    python -m benchmarks.bench_topk --device cuda --contexts 32768,131072 --batch 1,16 --k 128,896 --chunk 64

With --radix-programs N,M on CUDA the radix select is timed again aiming at N, M programs a pass
(token_topk_triton._TARGET_PROGRAMS, 512 by default: at batch 12 and 128k that is 6 programs a row, each reading
22k scores in turn), in `positions_ms_by_programs`.

blocks_ms: block_topk's positions (on CUDA its kernel: the block maxima, then one program a row over the blocks and
their positions), where its tiles hold the shape (else None).

Rows {device, context, batch, heads, k, chunk, torch_ms, two_stage_ms, positions_ms, blocks_ms,
positions_ms_by_programs, timing, machine, date, commit, command}: after --warmup calls, on CUDA each call captured
in a CUDA graph as a decode step runs it and the graph replayed --repeats times between two events (`timing:
graph`: the launches' host time is not counted; timed call by call, the H100 put the radix select's seven launches
at 0.22-0.73 ms, mostly that host time); on CPU the median of --repeats calls.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.rows import run_info, write_rows
from tailorkv.kernels import block_topk, token_topk
from tailorkv.kvcache.selection import two_stage_topk


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Milliseconds of one call: on CUDA of one replay of a CUDA graph that holds it, else the median call."""
    if device.type == "cuda":
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm up off the capture stream, as graph capture asks
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / repeats
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def with_programs(n: int, run):
    """run() with the radix select aiming at `n` programs a pass."""
    from tailorkv.kernels import token_topk_triton

    default = token_topk_triton._TARGET_PROGRAMS
    token_topk_triton._TARGET_PROGRAMS = n
    try:
        return run()
    finally:
        token_topk_triton._TARGET_PROGRAMS = default


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--contexts", default="32768,131072")
    p.add_argument("--batch", default="1,16")
    p.add_argument("--heads", type=int, default=8, help="KV heads (Llama-3.1-8B: 8)")
    p.add_argument("--k", default="128,896")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument(
        "--radix-programs", default="", help="on CUDA: programs a pass to time the radix select at"
    )
    p.add_argument("--output", default="benchmarks/results/topk.json")
    args = p.parse_args(argv)
    info, device, rows = run_info(__spec__.name, argv), torch.device(args.device), []
    print(
        f"{'context':>8} {'batch':>5} {'k':>5} {'torch ms':>9} {'two-stage ms':>12} {'positions ms':>12} {'blocks ms':>9}"
    )
    select, blocks = token_topk.ops(device).top_positions, block_topk.ops(device)
    # programs a pass to time the radix select at too (CUDA only: the CPU reference has none)
    programs = (
        [int(n) for n in args.radix_programs.split(",") if n] if device.type == "cuda" else []
    )
    for context in map(int, args.contexts.split(",")):
        for batch in map(int, args.batch.split(",")):
            g = torch.Generator(device).manual_seed(context + batch)
            scores = torch.randn(batch, args.heads, context, device=device, generator=g)
            # the range on the device, as the engine passes it (no copy inside the timed calls)
            lo, hi = (torch.tensor(x, device=device) for x in (0, context))
            for k in map(int, args.k.split(",")):

                def radix() -> float:
                    return timed(
                        lambda: select(scores, lo, hi, k), device, args.warmup, args.repeats
                    )

                ms = [
                    timed(fn, device, args.warmup, args.repeats)
                    for fn in (
                        lambda: scores.topk(k, dim=-1),
                        lambda: two_stage_topk(scores, k, args.chunk),
                    )
                ] + [radix()]
                fits = blocks.fits(context, min(k, context), args.chunk)
                ms.append(
                    timed(
                        lambda: blocks.top_positions(scores, lo, hi, k, chunk=args.chunk),
                        device,
                        args.warmup,
                        args.repeats,
                    )
                    if fits
                    else None
                )
                by_programs = {n: round(with_programs(n, radix), 4) for n in programs}
                rows.append(
                    {
                        "device": device.type,
                        "context": context,
                        "batch": batch,
                        "heads": args.heads,
                        "k": k,
                        "chunk": args.chunk,
                        "torch_ms": round(ms[0], 4),
                        "two_stage_ms": round(ms[1], 4),
                        "positions_ms": round(ms[2], 4),
                        "blocks_ms": None if ms[3] is None else round(ms[3], 4),
                        "positions_ms_by_programs": by_programs,
                        "timing": "graph" if device.type == "cuda" else "calls",
                        **info,
                    }
                )
                print(
                    f"{context:>8} {batch:>5} {k:>5} {ms[0]:>9.3f} {ms[1]:>12.3f} {ms[2]:>12.3f}",
                    f"{ms[3]:>9.3f}" if fits else f"{'-':>9}",
                    *(f"{n}: {t:.3f}" for n, t in by_programs.items()),
                    flush=True,
                )
    write_rows(args.output, rows)
    return rows


if __name__ == "__main__":
    main()
