"""Registers, spills and loads of the Triton kernels a CPU run launches, compiled for an NVIDIA GPU this machine
lacks (sm_90 unless --arch):

    python -m benchmarks.kernel_resources tests/test_host_copy.py -k kept

runs the pytest selection in the Triton interpreter (a subprocess with TRITON_INTERPRET=1), records each kernel
launch's argument types and constexprs as the JIT would specialize them (16-byte divisibility of pointers and
integers, integers equal to 1 as constants), then compiles each distinct launch with Triton's own ptxas and reads
the cubin with its cuobjdump. A row per launch: kernel, constexprs, num_warps, registers, stack bytes (spills),
shared memory, and the PTX's global loads by width. What a GPU would run, without one: register pressure, spills
and lost vector loads show before a device call. Timing still needs the device.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

_TYPES = {
    "torch.float32": "fp32",
    "torch.float16": "fp16",
    "torch.bfloat16": "bf16",
    "torch.float64": "fp64",
    "torch.int64": "i64",
    "torch.int32": "i32",
    "torch.int16": "i16",
    "torch.int8": "i8",
    "torch.uint8": "u8",
    "torch.bool": "i1",
    "torch.float8_e4m3fn": "fp8e4nv",
    "torch.float8_e5m2": "fp8e5",
}


def specialize(fn, args: tuple, kwargs: dict) -> dict:
    """One launch of `fn` (a Python function under @triton.jit) as the JIT specializes it: {kernel (module:name),
    signature {arg: type}, constexprs {arg: value}, divisible [args], num_warps, num_stages, maxnreg}."""
    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args), **{k: v for k, v in kwargs.items() if k in params})
    for name, p in params.items():
        if name not in bound and p.default is not inspect.Parameter.empty:
            bound[name] = p.default
    signature, constexprs, divisible = {}, {}, []
    for name, value in bound.items():
        if "constexpr" in str(params[name].annotation) or value is None:
            signature[name], constexprs[name] = "constexpr", value
        elif hasattr(value, "data_ptr"):
            signature[name] = "*" + _TYPES[str(value.dtype)]
            if value.data_ptr() % 16 == 0:
                divisible.append(name)
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int) and value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                divisible.append(name)
        else:
            signature[name] = "fp32"
    return {
        "kernel": f"{fn.__module__}:{fn.__name__}",
        "signature": signature,
        "constexprs": constexprs,
        "divisible": divisible,
        "num_warps": kwargs.get("num_warps", 4),
        "num_stages": kwargs.get("num_stages", 3),
        "maxnreg": kwargs.get("maxnreg"),
    }


def capture(path: str, pytest_args: list[str]) -> int:
    """Run pytest with every interpreted kernel launch recorded (distinct ones, to `path` as JSON)."""
    import pytest
    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, dict] = {}
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        launch = specialize(self.fn, args, kwargs)
        launches.setdefault(json.dumps(launch, sort_keys=True, default=str), launch)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording
    code = pytest.main([*pytest_args, "-q", "-p", "no:cacheprovider", "-p", "no:xdist"])
    with open(path, "w") as f:
        json.dump(list(launches.values()), f, default=str)
    return int(code)


def compile_launch(launch: dict, arch: int) -> dict:
    """The launch compiled for sm_`arch`: registers, stack bytes, shared bytes, global loads by width."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = launch["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    names = list(launch["signature"])
    src = ASTSource(
        fn=fn,
        signature=launch["signature"],
        constexprs={(names.index(k),): v for k, v in launch["constexprs"].items()},
        attrs={(names.index(k),): [["tt.divisibility", 16]] for k in launch["divisible"]},
    )
    options = {k: launch[k] for k in ("num_warps", "num_stages", "maxnreg") if launch[k]}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    cuobjdump = os.path.join(
        os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))  # noqa: E731
    loads = re.findall(r"\bld\.global[.\w]*", compiled.asm["ptx"])
    width = lambda ld: ".v4" if ".v4" in ld else ".v2" if ".v2" in ld else "scalar"  # noqa: E731
    return {
        "kernel": name,
        "constexprs": launch["constexprs"],
        "num_warps": launch["num_warps"],
        "maxnreg": launch["maxnreg"],
        "registers": field("REG"),
        "stack_bytes": field("STACK"),
        "shared_bytes": field("SHARED"),
        "loads": {w: sum(width(ld) == w for ld in loads) for w in ("scalar", ".v2", ".v4")},
    }


def compile_all(launches: str, rows: str, arch: int) -> None:
    """compile_launch for each launch in the JSON file `launches`, the rows to the JSON file `rows`."""
    with open(launches) as f:
        compiled = [compile_launch(launch, arch) for launch in json.load(f)]
    with open(rows, "w") as f:
        json.dump(compiled, f, default=str)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--output", help="write the rows here (JSON)")
    args, pytest_args = p.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        launches, compiled = os.path.join(tmp, "launches.json"), os.path.join(tmp, "rows.json")
        # the launches in the interpreter; compiled where the kernels are JIT functions (no TRITON_INTERPRET)
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        code = f"import sys, benchmarks.kernel_resources as k; sys.exit(k.capture({launches!r}, sys.argv[1:]))"
        done = subprocess.run([sys.executable, "-c", code, *pytest_args], env=env)
        if not os.path.exists(launches):
            raise SystemExit(
                f"the pytest run failed (exit {done.returncode}) before recording launches"
            )
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        code = f"import benchmarks.kernel_resources as k; k.compile_all({launches!r}, {compiled!r}, {args.arch})"
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        with open(compiled) as f:
            rows = json.load(f)
    print(
        f"{'kernel':<32} {'warps':>5} {'regs':>4} {'stack B':>7} {'loads scalar/v2/v4':>18}  constexprs"
    )
    for r in rows:
        loads = "/".join(str(n) for n in r["loads"].values())
        print(
            f"{r['kernel']:<32} {r['num_warps']:>5} {r['registers']:>4} {r['stack_bytes']:>7} {loads:>18}  "
            + ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        )
    if args.output:
        from benchmarks.rows import run_info, write_rows

        info = run_info(__spec__.name, argv)
        write_rows(args.output, [{**r, "arch": args.arch, **info} for r in rows])
    return rows


if __name__ == "__main__":
    main()
