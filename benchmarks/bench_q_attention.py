"""The Q layers' decode attention (kivi_triton.paged_decode_attention over 1- or 2-bit KIVI pages) swept over its
launch settings: the programs the context is split into (0: the module's rule), warps, pipeline stages and tokens
an iteration (--tiles). In the batch-16, 32k H200 profile it took 1.14 ms a step where its bytes take ~60 us at the
HBM rate (benchmarks/NOTES.md): latency-bound.
Its settings were chosen at batch 1 and 128k on an H100; this finds the best at the batches a throughput run holds.
`--share 0,4` also runs each setting as share_q_pages runs rows that share nothing: groups of up to 4 rows (16 query
rows a tile at GQA 4), each row alone, whose splits count one program per group (4x those of `0`, no groups).

    python -m benchmarks.bench_q_attention --contexts 32768,131072 --batch 1,12,16 --bits 1,2

Llama-3.1-8B's shape (32 query and 8 KV heads of 128), 64-token pages of random codes and scales, every row at the
full context with its last 128 tokens in the full-precision tails. Each setting's output is held to the first
setting's (float32 rounding of a different split only). Rows {device, context, batch, bits, target_programs,
num_warps, num_stages, tile, share, splits, us, gb_per_s, best, machine, date, commit, command}: median of
--repeats timed calls (CUDA events on the GPU); `best` marks the fastest setting of each context, batch and bits;
gb_per_s counts the quantized pages' bytes.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks.bench_topk import timed
from benchmarks.rows import run_info, write_rows
from tailorkv.kernels import kivi, kivi_triton

PAGE, RESIDUAL = 64, 128


def case(context: int, batch: int, bits: int, hq: int, h: int, d: int, device, dtype) -> tuple:
    """The arguments of paged_decode_attention: each row its own pages of random codes and scales."""
    g = torch.Generator(device).manual_seed(context + batch + bits)
    width = -(-context // PAGE)
    num_pages, words = batch * width, PAGE // kivi.codes_per_word(bits)
    vgroup = kivi.value_group(PAGE, d, bits)

    def codes(*shape):
        return torch.randint(
            -(2**31), 2**31 - 1, shape, generator=g, device=device, dtype=torch.int32
        )

    def scales(*shape):
        return (torch.rand(*shape, generator=g, device=device) * 0.1 + 0.01).half()

    def floats(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    quant = (context - RESIDUAL) // PAGE * PAGE
    lengths = torch.tensor([[context, quant, quant]] * batch, device=device)
    return (
        floats(batch, hq, d),
        codes(num_pages, h, words, d),
        scales(num_pages, h, d),
        scales(num_pages, h, d),
        codes(num_pages * PAGE, h, d * bits // 32),
        scales(num_pages * PAGE, h, d // vgroup),
        scales(num_pages * PAGE, h, d // vgroup),
        floats(batch, 2 * RESIDUAL, h, d),
        floats(batch, 2 * RESIDUAL, h, d),
        torch.arange(num_pages, device=device).view(batch, width),
        torch.arange(batch, device=device),
        lengths,
        bits,
        d**-0.5,
    )


def alone(batch: int, group: int, device) -> dict:
    """share_q_pages' arguments for rows that share nothing: each row leads a group of its own (quant_store's
    share_groups)."""
    members = torch.full((batch, group), -1, dtype=torch.long, device=device)
    members[:, 0] = torch.arange(batch, device=device)
    return {"members": members, "shared": torch.zeros(batch, dtype=torch.long, device=device)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--contexts", default="32768,131072")
    p.add_argument("--batch", default="1,12,16")
    p.add_argument("--bits", default="1,2")
    p.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head_dim")
    p.add_argument(
        "--programs",
        default="128,256,512,1024",
        help="target_programs to try (0: the default rule)",
    )
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument(
        "--tiles",
        default="64",
        help="tokens an iteration attends (a page of 64, or half of one: 32)",
    )
    p.add_argument(
        "--share",
        default="0",
        help="group sizes of share_q_pages' launch, every row alone (0: none)",
    )
    p.add_argument(
        "--registers",
        default="168",
        help="caps on registers a thread (0: the compiler's choice; 168: three 4-warp programs an SM, the "
        "kernel's default with 16-bit queries)",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--output", default="benchmarks/results/q_attention.json")
    args = p.parse_args(argv)
    info, device, rows = run_info(__spec__.name, argv), torch.device(args.device), []
    hq, h, d = map(int, args.heads.split(","))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    settings = list(
        itertools.product(
            ints(args.programs),
            ints(args.warps),
            ints(args.stages),
            ints(args.tiles),
            ints(args.share),
            ints(args.registers),
        )
    )
    print(
        f"{'context':>8} {'batch':>5} {'bits':>4} {'programs':>8} {'warps':>5} {'stages':>6} {'tile':>4} {'share':>5} "
        f"{'regs':>4} {'us':>9} {'GB/s':>7}"
    )
    for context, batch, bits in itertools.product(
        ints(args.contexts), ints(args.batch), ints(args.bits)
    ):
        inputs = case(context, batch, bits, hq, h, d, device, dtype)
        quant_bytes = sum(x.numel() * x.element_size() for x in inputs[1:7])
        first, done = None, []
        for programs, warps, stages, tile, share, registers in settings:
            knobs = dict(
                target_programs=programs,
                num_warps=warps,
                num_stages=stages,
                tile=tile,
                max_registers=registers,
            )
            groups = alone(batch, share, device) if share else {}
            out = kivi_triton.paged_decode_attention(*inputs, **knobs, **groups)
            if first is None:
                first = out
            err = (out - first).abs().max().item()
            if not err <= 1e-3 * max(1.0, first.abs().max().item()):
                raise AssertionError(
                    f"{knobs}, share {share}: output differs from the first setting's by {err}"
                )
            us = 1e3 * timed(
                lambda: kivi_triton.paged_decode_attention(*inputs, **knobs, **groups),
                device,
                args.warmup,
                args.repeats,
            )
            pairs = (-(-batch // share) if share else batch) * h
            _, splits = kivi_triton.context_splits(inputs[9].shape[1], pairs, programs)
            done.append(
                {
                    "device": device.type,
                    "context": context,
                    "batch": batch,
                    "bits": bits,
                    **knobs,
                    "share": share,
                    "splits": splits,
                    "us": round(us, 1),
                    "gb_per_s": round(quant_bytes / us / 1e3, 1),
                    **info,
                }
            )
            print(
                f"{context:>8} {batch:>5} {bits:>4} {programs:>8} {warps:>5} {stages:>6} {tile:>4} {share:>5} "
                f"{registers:>4} {us:>9.1f} {quant_bytes / us / 1e3:>7.1f}",
                flush=True,
            )
        best = min(done, key=lambda r: r["us"])
        for r in done:
            r["best"] = r is best
        print(
            f"best: {best['target_programs']} programs, {best['num_warps']} warps, {best['num_stages']} stages, "
            f"tile {best['tile']}, share {best['share']}, registers {best['max_registers']}"
        )
        rows += done
    write_rows(args.output, rows)
    return rows


if __name__ == "__main__":
    main()
