"""The linear layers of one forward step of the embedded model on CPU (float32): MKL's sgemm (nn.Linear) against
oneDNN with packed weights (models/cpu_linear.py, what the engine runs on CPU), at several batch sizes, in one run.

    python -m benchmarks.bench_cpu_linear --batch 1,3,16,256 --threads 1

Rows {batch, threads, mkl_ms, onednn_ms, speedup, repeats, machine, date, commit, command}: the median over
--repeats of all 121 layers (4 a decoder layer and the LM head) applied once, each to its own random input.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from benchmarks.rows import run_info, write_rows
from tailorkv.models.cpu_linear import PackedLinear
from tailorkv.models.loader import load_model


def step_ms(layers: list[nn.Module], inputs: list[torch.Tensor], repeats: int) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first one warms up
            t = time.perf_counter()
            for layer, x in zip(layers, inputs):
                layer(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:]) * 1e3


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="1,3,16,256", help="comma-separated rows a step")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_model(None, torch.device("cpu"), torch.float32, progress=False)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    plain = []
    for m in packed:
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        linear.weight, linear.bias = m.weight, m.bias
        plain.append(linear)
    info, rows = run_info("benchmarks.bench_cpu_linear", argv), []
    for batch in (int(b) for b in args.batch.split(",")):
        inputs = [torch.randn(batch, m.in_features) for m in packed]
        mkl, onednn = (step_ms(layers, inputs, args.repeats) for layers in (plain, packed))
        row = dict(batch=batch, threads=args.threads, mkl_ms=round(mkl, 2))
        row |= dict(onednn_ms=round(onednn, 2), speedup=round(mkl / onednn, 2))
        rows.append(row | {"repeats": args.repeats} | info)
        print(
            f"batch {batch}: MKL {mkl:.1f} ms, oneDNN packed {onednn:.1f} ms ({mkl / onednn:.2f}x)"
        )
    if args.output:
        write_rows(args.output, rows)
    return rows


if __name__ == "__main__":
    main()
