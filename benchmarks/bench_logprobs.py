"""What logprobs cost: one batch of greedy requests decoded offline, without logprobs, with each token's, with the
top-n, and with the prompt's too (echo / lm-eval scoring), on the same engine.

    python -m benchmarks.bench_logprobs --model dummy:llama-3.1-8b --batch 32 --prompt-len 1024 --output-len 128

Prints, per mode, the seconds of the whole batch and the decode rate (output tokens / s); rows {mode, batch,
prompt_len, output_len, seconds, output_tok_per_s, machine, date, commit, command} go to `--output`.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.rows import run_info, write_rows
from tailorkv import Engine
from tailorkv.engine.request import RequestOptions
from tailorkv.engine.sampling import SamplingParams

MODES = {
    "none": RequestOptions(),
    "chosen": RequestOptions(top_logprobs_num=0),
    "top5": RequestOptions(top_logprobs_num=5),
    "top5+prompt": RequestOptions(top_logprobs_num=5, logprob_start=0),
}


def run_batch(engine: Engine, prompts: list[list[int]], new: int, options: RequestOptions) -> float:
    params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    began = time.perf_counter()
    reqs = [engine.add_request(ids, params, options) for ids in prompts]
    while not all(r.finished for r in reqs):
        engine.step()
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--kv-policy", default="full")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    p.add_argument("--output", default="benchmarks/results/logprobs.json")
    args = p.parse_args(argv)
    info = run_info(__spec__.name, argv)
    engine = Engine(
        args.model, args.kv_policy, progress=False, enable_prefix_caching=False,
        max_running_requests=args.batch,
    )  # fmt: skip
    vocab = engine.config.vocab_size
    prompts = [
        [(b * 7919 + i * 104729) % vocab for i in range(args.prompt_len)] for b in range(args.batch)
    ]
    run_batch(engine, prompts[:1], 2, RequestOptions())  # warm up
    rows = []
    print(f"{'mode':>12} {'seconds':>8} {'out tok/s':>10}")
    for mode in args.modes.split(","):
        seconds = run_batch(engine, prompts, args.output_len, MODES[mode])
        rate = args.batch * args.output_len / seconds
        rows.append(
            {
                "mode": mode,
                "batch": args.batch,
                "prompt_len": args.prompt_len,
                "output_len": args.output_len,
                "seconds": round(seconds, 3),
                "output_tok_per_s": round(rate, 1),
                **info,
            }
        )
        print(f"{mode:>12} {seconds:>8.2f} {rate:>10.1f}", flush=True)
    write_rows(args.output, rows)
    return rows


if __name__ == "__main__":
    main()
