"""How many of a decode step's top-k rows the step before fetched too: what a GPU cache of the last step's rows
would keep off PCIe (the top-k fetch is 43% of tailor's 128k step at 13 requests, benchmarks/NOTES.md 2026-12-07).

    python -m benchmarks.bench_topk_reuse --policies tailor,tailor:ruler --samples 2 --prompt-tokens 6000 \
        --forced-tokens 32

Essay windows as in bench_paired: the first part the prompt, the rest teacher-forced one decode step at a time. At
every S layer of every step, per row and KV head: of the positions fetched (those the top-k marks valid), the share
the same row fetched at that layer in the step before (what `--tailor-reuse-rows` reads from the GPU, with N at
least k). Measure a real model: a dummy model's random weights say nothing of one. Eager steps (no CUDA graphs, no
compile): the fetch is recorded as it is called. Writes one row per policy {policy, preset, model, reuse,
reuse_by_layer, fetched, ..., machine, date, commit, command}.
"""

from __future__ import annotations

import argparse
import gc
from collections import defaultdict

import torch

from benchmarks.bench_paired import essay_windows
from benchmarks.policy_spec import identity, spec_engine
from benchmarks.rows import run_info, write_rows


class ReuseCounter:
    """Wraps an OffloadStore's fetch_rows: per (slot, S layer) the positions of the last fetch; per S layer the
    positions fetched and how many of them that slot's last fetch at that layer had."""

    def __init__(self, store):
        self.fetch, self.last = store.fetch_rows, {}
        self.fetched, self.kept = defaultdict(int), defaultdict(int)
        store.fetch_rows = self

    def __call__(self, layer, view, idx, valid=None):
        inside = (idx >= view.mid_begin[:, None, None]) & (idx < view.mid_end[:, None, None])
        if valid is not None:
            inside &= valid
        for row, slot in enumerate(view.slots.tolist()):
            now = [set(idx[row, h][inside[row, h]].tolist()) for h in range(idx.shape[1])]
            before = self.last.get((slot, layer))
            if before is not None:
                self.fetched[layer] += sum(map(len, now))
                self.kept[layer] += sum(len(a & b) for a, b in zip(now, before))
            self.last[slot, layer] = now
        return self.fetch(layer, view, idx, valid)

    def reset(self) -> None:
        """A new request may take a slot: nothing of the last one's fetches counts."""
        self.last.clear()


def measure(spec: str, args) -> dict:
    with spec_engine(
        spec,
        args,
        chunked_prefill_size=args.chunk,
        host_kv_gib=args.host_kv_gib,
        kv_cache_gib=args.kv_cache_gib,
        max_running_requests=1,
        cuda_graph=False,
        enable_torch_compile=False,
        overlap_schedule=False,
    ) as engine:
        counter = ReuseCounter(engine.policy.offload)
        windows = essay_windows(engine, args.prompt_tokens, args.forced_tokens, args.samples)
        for x in windows:  # one at a time: a row's slot is its own for all its steps
            counter.reset()
            engine.forced([x[: args.prompt_tokens]], [x[args.prompt_tokens :]], 1)
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    fetched, kept = sum(counter.fetched.values()), sum(counter.kept.values())
    return {
        "samples": len(windows),
        "fetched": fetched,
        "reuse": round(kept / max(fetched, 1), 4),
        "reuse_by_layer": {
            str(layer): round(counter.kept[layer] / max(n, 1), 3)
            for layer, n in sorted(counter.fetched.items())
        },
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--policies", default="tailor", help="comma-separated tailor policy specs")
    p.add_argument("--samples", type=int, default=2, help="essay windows")
    p.add_argument("--prompt-tokens", type=int, default=6000)
    p.add_argument("--forced-tokens", type=int, default=32, help="teacher-forced decode steps")
    p.add_argument("--chunk", type=int, default=8192, help="chunked prefill size")
    p.add_argument("--host-kv-gib", type=float, default=4.0)
    p.add_argument("--kv-cache-gib", type=float, default=None)
    p.add_argument("--output", default="benchmarks/results/topk_reuse.json")
    args = p.parse_args(argv)
    args.tp_size = 1  # the fetch is wrapped in this process
    info = run_info(__spec__.name, argv)
    rows = []
    for spec in args.policies.split(","):
        m = measure(spec, args)
        row = {
            **identity(spec),
            "model": args.model or "embedded",
            "prompt_tokens": args.prompt_tokens,
            "forced_tokens": args.forced_tokens,
            **m,
            **info,
        }
        rows.append(row)
        print(
            f"{spec:<40} reuse {m['reuse']:.3f} of {m['fetched']} fetched rows "
            f"(layers {min(m['reuse_by_layer'].values(), default=0):.2f}-"
            f"{max(m['reuse_by_layer'].values(), default=0):.2f})",
            flush=True,
        )
        write_rows(args.output, rows)
    return rows


if __name__ == "__main__":
    main()
