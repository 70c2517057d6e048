"""`tailorkv serve | generate | calibrate`. User errors print one line to stderr and exit with code 2."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from .api.limits import HttpLimits
from .config import EngineConfig, InputLimits
from .errors import ConfigError, TailorKVError
from .kvcache.budget import TARGET

# engine arguments that are options of the KV policy: argument name -> option name (kvcache/tailor_config.py)
POLICY_ARGS = {
    "tailor_preset": "tailor_preset",
    "key_sketch": "key_sketch",
    "tailor_top_k": "top_k",
    "tailor_sink": "sink",
    "tailor_recent": "recent",
    "tailor_d_s": "d_s",
    "tailor_quant_bits": "quant_bits",
    "host_kv_dtype": "host_kv_dtype",
    "speculative_fetch": "speculative_fetch",
    "tailor_radix_topk": "radix_topk",
    "tailor_topk_chunk": "topk_chunk",
    "tailor_position_order": "position_order",
    "tailor_fp8_row_align": "fp8_row_align",
    "tailor_share_q_pages": "share_q_pages",
    "tailor_gpu_rows_gib": "gpu_rows_gib",
    "tailor_reuse_rows": "reuse_rows",
    "cascade_attention": "cascade",
}
TAILOR_KNOBS = (  # (flag, help): integer TailorKV settings over the preset's
    (
        "--tailor-top-k",
        "dominant prompt tokens an S layer fetches per step, every layer (auto: per layer)",
    ),
    ("--tailor-sink", "first prompt tokens an S layer always attends to"),
    ("--tailor-recent", "last prompt tokens an S layer always attends to"),
    ("--tailor-d-s", "key channels per KV head that token selection scores on"),
    ("--tailor-quant-bits", "bits of the Q layers' KV cache: 1, 2 or 4"),
    (
        "--tailor-radix-topk",
        "N: stage 2's top-k by radix select on CUDA in decode steps of at most N sequences (default 1), else by "
        "torch.topk",
    ),
    (
        "--tailor-topk-chunk",
        "stage 2's top-k over the blocks of N positions with the largest maxima first, then of their positions "
        "(default 32; 0: one top-k over the whole context)",
    ),
    (
        "--tailor-position-order",
        "N: in decode steps of at least N rows the top-k positions sorted into position order before the "
        "fetch (default 40; 0: never)",
    ),
    (
        "--tailor-share-q-pages",
        "1 (default): rows sharing a document's Q-layer pages attend over them once a group; 0: each row alone",
    ),
    (
        "--tailor-fp8-row-align",
        "--host-kv-dtype fp8: rows padded to a multiple of 4 bytes (default) or 16 (16-byte PCIe loads)",
    ),
    (
        "--tailor-reuse-rows",
        "N: each request keeps the first N rows per S layer and KV head its last decode step fetched on the GPU, "
        "and reads those the next step selects again there, not over PCIe (default 0: off)",
    ),
)


def option_args(option: str, value) -> list[str]:
    """The CLI arguments that set a KV-policy option or an engine setting to `value` (top_k=64 -> --tailor-top-k 64;
    overlap_schedule=True -> --enable-overlap-schedule)."""
    arg = next((a for a, o in POLICY_ARGS.items() if o == option), None)
    if arg is not None:
        return ["--" + arg.replace("_", "-"), str(value)]
    p = argparse.ArgumentParser(add_help=False)
    add_engine_args(p)
    action = next((a for a in p._actions if a.dest == option), None)
    if action is None:
        raise ConfigError(f"no command-line flag sets {option!r}")
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        # a switch: the one of its flags that sets `value` (--enable-x / --disable-x)
        flag = next((a for a in p._actions if a.dest == option and a.const == bool(value)), None)
        return flag.option_strings[:1] if flag else []
    return [action.option_strings[0], str(value)]


def _int_option(flag: str):
    """An argparse type: an integer, else a ConfigError (one line, exit 2) naming the flag."""

    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{flag} must be an integer, got {text!r}") from None

    return parse


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "--model-path",
        dest="model",
        default=None,
        help="HF directory, .gguf file or dummy:<name>; default: the embedded SmolLM2-135M-Instruct",
    )
    p.add_argument(
        "--kv-policy", default="full", help="full | tailor | kivi | offload | streaming | quest"
    )
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    p.add_argument(
        "--tailor-preset",
        default=None,
        help="tailor: auto (the model's calibrated per-layer budget; default for real models) | longbench | "
        "ruler (the paper's; longbench is the default for dummy models)",
    )
    for flag, text in TAILOR_KNOBS:
        p.add_argument(
            flag, type=_int_option(flag), default=None, metavar="N", help=f"tailor: {text}"
        )
    p.add_argument(
        "--key-sketch",
        "--tailor-key-sketch",
        type=_int_option("--key-sketch"),
        default=None,
        metavar="BITS",
        help="tailor: score tokens from a 1/2-bit copy of K in the GPU tier (0: the paper's stage 1)",
    )
    p.add_argument(
        "--speculative-fetch",
        "--tailor-speculative-fetch",
        type=_int_option("--speculative-fetch"),
        default=None,
        metavar="0|1",
        help="tailor: pick and fetch layer l+1's top-k rows at layer l with the predicted query, overlapped with "
        "layer l (1); with the real query (0, default)",
    )
    p.add_argument(
        "--cascade-attention",
        type=_int_option("--cascade-attention"),
        default=None,
        metavar="0|1",
        help="full: decode rows that share a document's pages read them once per group (1, default); each row its "
        "own pages (0)",
    )
    p.add_argument(
        "--host-kv-dtype",
        choices=("auto", "fp8"),
        default=None,
        help="tailor: the host tier's token rows in the compute dtype (auto) or float8 e4m3 with a per-token, "
        "per-KV-head scale (fp8: half the host bytes; prompt-time reads see the dequantized rows)",
    )
    p.add_argument(
        "--tailor-gpu-rows-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="tailor: GiB of the GPU KV budget that hold the prompt rows of requests past what the host tier holds "
        "(rows on the GPU alone; default 0; needs the key sketch)",
    )
    p.add_argument(
        "--logprobs-mode",
        choices=("raw", "processed"),
        default=None,
        help="logprobs of the raw logits (default) or after penalties, logit bias, grammar and temperature",
    )
    p.add_argument(
        "--input-limits",
        default=None,
        metavar="JSON",
        help="what one request may ask for, e.g. '{\"stop_strings\": 256}' (config.InputLimits: "
        "stop_strings 128, stop_chars 1024, stop_token_ids 1024, stop_regex 16, stop_regex_chars 256, "
        "logit_bias 1024, n 128, grammar_chars 32768)",
    )
    p.add_argument(
        "--tp-size",
        "--tp",
        type=int,
        default=None,
        help="tensor-parallel ranks, one process and GPU each (KV budgets are per rank)",
    )
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--max-queued-requests", type=int, default=None)
    p.add_argument(
        "--chunked-prefill-size",
        type=int,
        default=None,
        help="prompt tokens a step computes at most; default 8192 on CUDA, 2048 on CPU",
    )
    p.add_argument(
        "--step-budget-ms",
        type=float,
        default=None,
        metavar="MS",
        help="while requests decode, a step computes only as many prompt tokens as fit in MS ms (a cost model "
        "of the chunk measured as the engine runs); default 200 on CUDA, 0 (off: --chunked-prefill-size "
        "only) on CPU",
    )
    p.add_argument(
        "--reserve-output-tokens",
        type=int,
        default=None,
        help="answer tokens a request reserves KV pages for at admission and at each growth (default 256)",
    )
    p.add_argument(
        "--max-passes",
        type=int,
        default=None,
        help="how many later requests may pass a queued one that does not fit yet (default 16)",
    )
    p.add_argument("--kv-cache-gib", type=float, default=None, help="GPU-tier KV budget")
    p.add_argument(
        "--host-kv-gib",
        type=float,
        default=None,
        help="host-tier (pinned) KV budget per rank (default 4; `serve` on CUDA: 3/4 of the memory available "
        "at start, shared by the ranks)",
    )
    p.add_argument(
        "--gpu-memory-limit", dest="gpu_memory_limit_gib", type=float, default=None, metavar="GIB"
    )
    p.add_argument(
        "--disable-prefix-caching",
        action="store_true",
        help="do not share the KV pages of common prompt prefixes between requests",
    )
    p.add_argument(
        "--prefix-gpu-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="tailor, kivi: GPU memory for copies of host-tier pages, which later prompts (and a prompt's "
        "later prefill chunks) then read without PCIe (0: none; default: with prefix caching what the "
        "other GPU pools leave, at most half, else none)",
    )
    p.add_argument(
        "--disable-cuda-graph",
        action="store_true",
        help="run decode steps eagerly (no CUDA graphs)",
    )
    p.add_argument(
        "--enable-torch-compile",
        action="store_true",
        default=None,
        help="fuse the norms, SwiGLU's gate and RoPE with torch.compile (the first steps of each shape compile; "
        "the default on CUDA)",
    )
    p.add_argument(
        "--disable-torch-compile",
        dest="enable_torch_compile",
        action="store_false",
        default=None,
        help="run the norms, SwiGLU's gate and RoPE as eager torch",
    )
    p.add_argument(
        "--enable-overlap-schedule",
        dest="overlap_schedule",
        action="store_true",
        default=None,
        help="launch each decode step before the previous step's tokens reach the host, as SGLang's overlap "
        "scheduler (one rank; the default on CUDA at --tp 1)",
    )
    p.add_argument(
        "--disable-overlap-schedule",
        dest="overlap_schedule",
        action="store_false",
        default=None,
        help="run each decode step after the previous step's tokens reached the host",
    )


def engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    """The EngineConfig that the engine arguments of `args` give (a setting left out keeps its default), with
    `overrides` on top; raises ConfigError for a bad value before any model loads."""
    names = {f.name for f in fields(EngineConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.disable_prefix_caching:
        kw["enable_prefix_caching"] = False
    if args.disable_cuda_graph:
        kw["cuda_graph"] = False
    if args.input_limits is not None:
        try:
            limits = json.loads(args.input_limits)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--input-limits is not JSON: {e}") from None
        if not isinstance(limits, dict):
            raise ConfigError("--input-limits must be a JSON object")
        kw["input_limits"] = InputLimits.from_dict(limits)
    policy = {o: getattr(args, a) for a, o in POLICY_ARGS.items() if getattr(args, a) is not None}
    return EngineConfig(**{**kw, "policy_options": policy, **overrides})


def cmd_generate(args) -> None:
    from .engine.engine import Engine
    from .engine.sampling import SamplingParams
    from .errors import InvalidRequestError

    # check the request before spending seconds on loading the model
    SamplingParams.from_any(
        {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    )
    if not args.prompt:
        raise InvalidRequestError("the prompt is empty")
    with Engine.from_config(engine_config(args)) as engine:
        prompt = args.prompt
        if args.chat:
            prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        out = engine.generate(
            prompt,
            sampling_params={
                "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature,
            },
        )
        print(out["text"])


def cmd_serve(args) -> None:
    # a bad setting fails before the server's imports and the model load
    config = engine_config(args, **serve_defaults(args))
    from .api.server import serve

    if not args.shutdown_timeout >= 0:
        raise ConfigError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    limits = HttpLimits(
        int(args.max_body_mib * (1 << 20)),
        args.body_timeout,
        args.header_timeout,
        args.limit_concurrency or None,
    )
    serve(
        config,
        args.host,
        args.port,
        args.api_key,
        args.served_model_name,
        args.shutdown_timeout,
        limits,
    )


def serve_defaults(args) -> dict:
    """What a server (one engine per process) defaults to beyond EngineConfig's: on CUDA a host tier of 3/4 of
    the memory available (default_host_gib), so that a 128k-token request fits without --host-kv-gib."""
    if args.host_kv_gib is not None:
        return {}
    import torch

    from .memory.host_memory import default_host_gib

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return {"host_kv_gib": default_host_gib(device.startswith("cuda"), args.tp_size or 1)}


def cmd_calibrate(args) -> None:
    from .engine.engine import Engine
    from .errors import ConfigError

    config = engine_config(args, kv_policy="full", kv_cache_gib=0.01)
    text = None
    if args.text:
        try:
            with open(args.text) as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read --text {args.text}: {e.strerror}") from None
    with Engine.from_config(config) as engine:
        cal = engine.calibrate(text, args.tokens, args.tau, args.target)
    b = cal.budget
    print(f"{'layer':>5}  {'score':>7}  {'kind':<19}  top_k at " + "  ".join(map(str, b.contexts)))
    for i, s in enumerate(cal.scores):
        kind = "Q (quantize)" if s > args.tau else "S (offload + top-k)"
        ks = "  ".join(f"{b.top_k(i, n):>{len(str(n))}}" for n in b.contexts)
        print(f"{i:>5}  {s:7.4f}  {kind:<19}  {'':>8} {ks}")
    print(
        f"budget: {b.target * 100:g}% of the attention mass, sink {b.sink} + recent {b.recent} + top_k <= {b.cap}"
    )
    print(f"plan for {engine.config.name} (tau={args.tau}): quant_layers={cal.quant_layers}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tailorkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a completion offline")
    add_engine_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="run the HTTP server (SGLang /generate + OpenAI /v1)")
    add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=30000)
    s.add_argument("--api-key", default=None)
    s.add_argument("--served-model-name", default=None)
    s.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM / Ctrl-C: take no new work, let running requests finish for up to S seconds, "
        "then end the rest with an error (a second signal: at once)",
    )
    d = HttpLimits()
    s.add_argument(
        "--max-body-mib",
        type=float,
        default=d.max_body_bytes / (1 << 20),
        help="a larger request body is answered 413 (default 8)",
    )
    s.add_argument(
        "--body-timeout",
        type=float,
        default=d.body_timeout_s,
        metavar="S",
        help="a request body without progress for S seconds is answered 408 (default 30)",
    )
    s.add_argument(
        "--header-timeout",
        type=float,
        default=d.header_timeout_s,
        metavar="S",
        help="a connection without a complete request header for S seconds is closed (default 10)",
    )
    s.add_argument(
        "--limit-concurrency",
        type=int,
        default=d.limit_concurrency,
        metavar="N",
        help="connections and requests in flight beyond N are answered 503 (default 2048; 0: no limit)",
    )
    s.add_argument(
        "--scheduler-delay-factor",
        type=float,
        default=None,
        metavar="F",
        help="a waiting request joins decoding ones once it has waited F x the last prefill step's time; "
        "while idle, a prefill is held until that long after the latest request came or finished "
        "(at most 0.5 s), so that a burst prefills together (default 0.35; 0: off)",
    )
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("calibrate", help="compute the TailorKV layer plan of a model")
    add_engine_args(c)
    c.add_argument(
        "--text", default=None, help="calibration text file (default: Paul Graham essays)"
    )
    c.add_argument("--tau", type=float, default=0.2)
    c.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="calibration prompt length (default: 8192 on CPU, 32768 on CUDA, at most the model's context)",
    )
    c.add_argument(
        "--target",
        type=float,
        default=TARGET,
        help="attention mass an S layer's window and top-k tokens carry (the auto budget; default 0.975)",
    )
    c.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except TailorKVError as e:
        print(f"tailorkv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
