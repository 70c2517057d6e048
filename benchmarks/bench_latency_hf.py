"""The external peer for bench_latency: HF transformers decoding the same weights, with its DynamicCache on the GPU
and with its offloaded cache (every layer's KV in host memory, brought back layer by layer each step).

    python -m benchmarks.bench_latency_hf --model dummy:llama-3.1-8b --contexts 32768,131072 --steps 32

The model is this engine's loader's (so `dummy:` weights are bit-identical to the engine's), moved into
transformers' LlamaForCausalLM. Rows use bench_latency's schema (policy `hf-dynamic` / `hf-offloaded`) and are
appended to --output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from benchmarks.rows import run_info, write_rows
from tailorkv.models.llama import hf_state_dict
from tailorkv.models.loader import load_model


def hf_model(name: str):
    import transformers

    ours, _ = load_model(name, torch.device("cuda"), torch.bfloat16, progress=False)
    cfg = transformers.LlamaConfig(
        **{k: v for k, v in ours.config.to_hf().items() if k != "architectures"}
    )
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    missing, unexpected = model.load_state_dict(hf_state_dict(ours), strict=False)
    if unexpected or [k for k in missing if not k.endswith("rotary_emb.inv_freq")]:
        raise RuntimeError(f"weights do not map onto transformers' Llama: {missing} {unexpected}")
    return model.eval(), ours.config


def make_cache(kind: str):
    from transformers import DynamicCache

    if kind == "hf-dynamic":
        return DynamicCache()
    try:
        return DynamicCache(offloading=True)
    except TypeError:  # older transformers: a separate class
        from transformers import OffloadedCache

        return OffloadedCache()


@torch.inference_mode()
def measure(model, kind: str, context: int, args) -> dict:
    ids = torch.randint(
        100,
        40000,
        (1, context - args.steps - args.warmup),
        device="cuda",
        generator=torch.Generator(device="cuda").manual_seed(context),
    )
    cache = make_cache(kind)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t0
    tok = out.logits[:, -1:].argmax(-1)
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        out = model(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    kv = (
        sum(
            x.numel() * x.element_size()
            for layer in cache.layers
            for x in (layer.keys, layer.values)
        )
        if hasattr(cache, "layers")
        else None
    )
    on_gpu = kind == "hf-dynamic"
    return {
        "policy": kind,
        "preset": None,
        "context": context,
        "batch": 1,
        "gpu_memory_limit_gib": None,
        "ms_per_token": round(1e3 * statistics.median(times), 2),
        "prefill_s": round(prefill, 3),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
        "gpu_kv_bytes": kv if on_gpu else None,
        "host_kv_bytes": None if on_gpu else kv,
        "floor_ms": None,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="dummy:llama-3.1-8b")
    p.add_argument("--caches", default="hf-dynamic,hf-offloaded")
    p.add_argument("--contexts", default="16384,32768,65536,131072")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--output", default="benchmarks/results/latency_hf.json")
    args = p.parse_args(argv)
    info = run_info(__spec__.name, argv)
    model, _ = hf_model(args.model)
    rows = json.load(open(args.output)) if os.path.exists(args.output) else []
    print(
        f"{'cache':<14} {'context':>8} {'ms/token':>9} {'prefill s':>9} {'peak GPU GiB':>12}",
        flush=True,
    )
    for kind in args.caches.split(","):
        for context in (int(x) for x in args.contexts.split(",")):
            try:
                row = measure(model, kind, context, args)
            except torch.OutOfMemoryError:
                row = {
                    "policy": kind,
                    "context": context,
                    "batch": 1,
                    "ms_per_token": None,
                    "error": "OOM",
                }
            torch.cuda.empty_cache()
            row.update(info)
            rows.append(row)
            print(
                f"{kind:<14} {context:>8} {row['ms_per_token'] or 'OOM':>9} {row.get('prefill_s') or '-':>9} "
                f"{(row.get('peak_gpu_bytes') or 0) / 2**30:>12.1f}",
                flush=True,
            )
            write_rows(args.output, rows)
    return rows


if __name__ == "__main__":
    main()
