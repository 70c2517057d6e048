"""A benchmark's policy spec: `name`, `name:preset` or `name:preset:option=value[:option=value]`
(e.g. `tailor:longbench:key_sketch=1`, `tailor::quant_layers=[0]`, `tailor:longbench:host_kv_dtype=fp8`,
`full::enable_torch_compile=true`); the preset is a tailor preset (streaming and quest take its budget)."""

from __future__ import annotations


def parse_policy(spec: str) -> tuple[str, str | None, dict]:
    """(policy name, preset or None, options: integers where they parse as one, true and false as booleans, a
    bracketed list as a list of integers (`quant_layers=[0,2]`), else strings)."""
    name, *rest = spec.split(":")
    options = dict(o.partition("=")[::2] for o in rest[1:])
    return name, (rest[0] if rest else None) or None, {k: _value(v) for k, v in options.items()}


def _value(text: str):
    if text.lstrip("-").isdigit():
        return int(text)
    if text.startswith("[") and text.endswith("]"):
        return [_value(x.strip()) for x in text[1:-1].split(",") if x.strip()]
    return {"true": True, "false": False}.get(text.lower(), text)


def engine_options(spec: str) -> tuple[str, dict]:
    """(kv_policy, Engine keyword options) of a spec."""
    name, preset, options = parse_policy(spec)
    return name, {**options, **({"tailor_preset": preset} if preset else {})}


def spec_engine(spec: str, args, **settings):
    """An Engine of a spec with a benchmark's common flags (--model, --device, --dtype, --tp) and `settings`."""
    from tailorkv import Engine

    name, options = engine_options(spec)
    return Engine(
        model=args.model,
        kv_policy=name,
        device=args.device,
        dtype=args.dtype,
        progress=False,
        tp_size=args.tp_size,
        **settings,
        **options,
    )


def identity(spec: str) -> dict:
    """The policy fields of a result row (options only when the spec has some)."""
    name, preset, options = parse_policy(spec)
    return {"policy": name, "preset": preset, **({"options": options} if options else {})}


def add_tp_argument(p) -> None:
    """--tp-size / --tp: the engine's tensor-parallel ranks (one GPU each)."""
    p.add_argument("--tp-size", "--tp", type=int, default=1, help="tensor-parallel ranks")


def label(row: dict) -> str:
    """The spec back from a result row."""
    options = "".join(f":{k}={v}" for k, v in row.get("options", {}).items())
    return f"{row['policy']}{':' + row['preset'] if row['preset'] else ''}{options}"
