"""The top-k fetch (host_copy.gather_rows over UVA) as a decode step sees it: warm, and after the GPU's caches were
swept by other work.

    python -m benchmarks.bench_uva_gather --output benchmarks/results/uva_gather.json

A pinned host tier of `--host-gib` (host_tensor: cudaHostRegister) in pages of [256 tokens, 8 heads, 512-B rows]
(Llama-3.1-8B's layout); `--batch` requests, each with its pages contiguous; 31 layers' worth of top-k indices
(128 random rows per request and head, in torch.topk's rank order or sorted into position order: `--order`, as
the two-stage top-k and the radix select hand them over). Each gather is timed alone with CUDA events, either
right after the previous gather (`swept=False`) or after a 1 GiB device-to-device copy (`swept=True`), which is
what the weights streaming through L2 do between two layers' fetches in a real step. The host tier is allocated
once in transparent huge pages and once in 4 KiB pages (`--huge-pages both`, the default; host_tensor's
`huge_pages`): whether rows scattered over gigabytes gather faster in 2 MiB pages (on the H200 they did not,
benchmarks/NOTES.md). `--rows bf16,fp8,fp8a16`: the host tier's rows as bf16 K|V (512 bytes), as packed fp8 rows
(`--host-kv-dtype fp8`: 260 bytes, gathered as 32-bit words) and as fp8 rows padded to 272 bytes (`fp8_row_align`
16: gathered in 16-byte loads); `us` compares them at the same rows (`gb_per_s` counts the padding). `--shapes 40x128` adds batch 40 at
32k, where the step's fetch ran at ~10.6 GB/s on the H100 (benchmarks/NOTES.md, 2026-12-06); `--pages per-layer`
gives each layer's gather its own requests' pages, as a step's layers each read their own tier. Prints a table,
writes rows {rows, row_bytes, huge_pages, order, pages, batch, context_pages, swept, us, gb_per_s, machine, date,
commit, command}.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks.rows import run_info, write_rows
from tailorkv.kernels import host_copy, host_fp8
from tailorkv.memory.host_memory import host_tensor

H, T, D = 8, 256, 128


def gather_us(
    rows: torch.Tensor,
    batch: int,
    context_pages: int,
    k: int,
    swept: bool,
    layers: int = 31,
    sort: bool = False,
    per_layer: bool = False,
) -> float:
    ops = host_copy.ops(torch.device("cuda"))
    groups = rows.shape[0] // context_pages

    def requests_pages() -> torch.Tensor:
        first = torch.randperm(groups)[:batch] * context_pages
        return (first[:, None] + torch.arange(context_pages)).cuda()

    # per_layer: each layer's requests in other pages of the tier, as a step's 31 layers each read their own tier
    # (at batch 40 and 32k, 84 GB of fp8 rows): the GPU's translations of host pages no longer repeat layer to layer
    pages = (
        [requests_pages()] * layers if not per_layer else [requests_pages() for _ in range(layers)]
    )
    idx = [
        torch.rand(batch, H, context_pages * T, device="cuda").topk(k, -1).indices
        for _ in range(layers)
    ]
    if sort:
        idx = [i.sort(-1).values for i in idx]
    sweep_src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    sweep_dst = torch.empty_like(sweep_src)
    times = []
    for rep in range(3):  # the first pass compiles and warms up
        for i, pg in zip(idx, pages):
            if swept:
                sweep_dst.copy_(sweep_src)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(
                200_000
            )  # the GPU is busy while the gather is launched: the events time the kernel only
            start.record()
            ops.gather_rows(rows, pg, i)
            end.record()
            torch.cuda.synchronize()
            if rep:
                times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host-gib", type=float, default=16)
    p.add_argument("--top-k", type=int, default=128)
    p.add_argument("--output", default="benchmarks/results/uva_gather.json")
    p.add_argument("--huge-pages", choices=("both", "on", "off"), default="both")
    p.add_argument("--rows", default="bf16", help="comma-separated: bf16, fp8, fp8a16")
    p.add_argument(
        "--shapes",
        default="1x512,4x512,16x128",
        help="requests x context pages (256 tokens a page)",
    )
    p.add_argument("--order", default="rank", help="comma-separated: rank, position")
    p.add_argument(
        "--pages",
        default="shared",
        help="comma-separated: shared (every layer reads the same requests' pages), per-layer (each its own)",
    )
    args = p.parse_args(argv)
    info = run_info(__spec__.name, argv)
    out = []
    print(
        f"{'rows':>6} {'huge':>5} {'order':>8} {'pages':>9} {'batch':>5} {'context':>8} {'swept':>6} {'us':>8} "
        f"{'GB/s':>6}"
    )
    kinds = {
        "bf16": (torch.bfloat16, 2 * D),
        "fp8": (torch.uint8, host_fp8.row_width(D)),
        "fp8a16": (torch.uint8, host_fp8.row_width(D, 16)),
    }
    unknown = set(args.rows.split(",")) - set(kinds)
    if unknown:
        p.error(f"--rows: unknown {', '.join(sorted(unknown))}; choose from {', '.join(kinds)}")
    orders, page_sets = args.order.split(","), args.pages.split(",")
    if set(orders) - {"rank", "position"}:
        p.error(f"--order: rank or position, got {args.order!r}")
    if set(page_sets) - {"shared", "per-layer"}:
        p.error(f"--pages: shared or per-layer, got {args.pages!r}")
    try:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        p.error(f"--shapes: requests x context pages, e.g. 16x128, got {args.shapes!r}")
    for kind, huge in (
        (k, h)
        for k in args.rows.split(",")
        for h in {"both": (True, False), "on": (True,), "off": (False,)}[args.huge_pages]
    ):
        dtype, width = kinds[kind]
        row_bytes = width * dtype.itemsize
        rows = host_tensor(
            (int(args.host_gib * 2**30) // (H * T * row_bytes), T, H, width),
            dtype,
            True,
            huge_pages=huge,
        )
        for (batch, context_pages), order, page_set, swept in itertools.product(
            shapes, orders, page_sets, (False, True)
        ):
            sort, per_layer = order == "position", page_set == "per-layer"
            us = gather_us(
                rows, batch, context_pages, args.top_k, swept, sort=sort, per_layer=per_layer
            )
            gbs = batch * H * args.top_k * row_bytes / us / 1e3
            out.append(
                {
                    "rows": kind,
                    "row_bytes": row_bytes,
                    "huge_pages": huge,
                    "order": order,
                    "pages": page_set,
                    "batch": batch,
                    "context_pages": context_pages,
                    "swept": swept,
                    "us": round(us, 1),
                    "gb_per_s": round(gbs, 1),
                    **info,
                }
            )
            print(
                f"{kind:>6} {huge!s:>5} {order:>8} {page_set:>9} {batch:>5} {context_pages * T:>8} "
                f"{swept!s:>6} {us:>8.1f} {gbs:>6.1f}",
                flush=True,
            )
        del rows  # unregistered and freed before the next tier is locked
    write_rows(args.output, out)
    return out


if __name__ == "__main__":
    main()
