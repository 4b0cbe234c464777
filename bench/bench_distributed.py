"""Distributed attention on the GPUs of one host: plain-jit sharding and context parallelism.

    python3 bench/bench_distributed.py check          # correctness on 2 GPUs vs 1 (small shapes)
    python3 bench/bench_distributed.py plain          # dp / tp sharded inputs, (8, 4096, 32/8, 128) causal
    python3 bench/bench_distributed.py cp 32768 65536 131072   # context parallel, each scheme, +- balancing
    python3 bench/bench_distributed.py cp 131072 --schemes=ulysses,auto       # some schemes only
    python3 bench/bench_distributed.py scale 131072 262144 524288 --gpus=1,2,4,8  # scaling (4-8 GPUs)

`plain` times forward+backward of every backend on one GPU, then with batch (dp) or head
(tp) sharded inputs under plain `jax.jit` (no metadata) and with `metadata.mesh`, and
reports the speed-up over one GPU and the output sharding. `cp` times causal GQA (32 q / 8
kv heads, head_dim 128, batch 1) forward+backward over the whole sequence on one GPU (where
it fits) and with the sequence split over every GPU by ring / all_gather / ulysses,
contiguous or load balanced (`auto` also): tokens/s and the speed-up. Method:
`jaxattn.bench.time_call` (median of repetitions of back-to-back jitted calls after two
warm-ups). `scale` runs the best schemes on 1, 2, 4 and 8 GPUs (those present), forward and
forward+backward, and a (dp=2, sp) mesh from 4 GPUs on, and reports each against one GPU at
the longest length it ran. Each part writes `$OUT/distributed-<part>.json` (or ./) and prints
a table.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxattn
from jaxattn.bench import attention_flops, time_call

BWD = 3.5  # forward+backward counts 3.5x the forward FLOPs (the peers' tables)
SMALL = os.environ.get("BENCH_SMALL") == "1"  # tiny shapes: a smoke run of the script on CPU devices


def inputs(b: int, s: int, hq: int, hkv: int, d: int, dtype=jnp.bfloat16):
    if SMALL:
        s, d, dtype = min(s, 64), 16, jnp.float32
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    return tuple(jax.random.normal(k, shape, dtype) for k, shape in zip(
        ks, ((b, s, hq, d), (b, s, hkv, d), (b, s, hkv, d), (b, s, hq, d))))


def fwd_bwd(backend: str, metadata=None):
    """A jitted forward+backward (the VJP with cotangent `do`) of causal attention."""
    backend = "xla" if SMALL and backend != "auto" else backend  # a CPU smoke run has no GPU backends
    def f(q, k, v, do):
        out, vjp = jax.vjp(lambda q, k, v: jaxattn.attention(q, k, v, is_causal=True, backend=backend,
                                                            metadata=metadata), q, k, v)
        return vjp(do)
    return jax.jit(f)


def rel(a, b) -> float:
    a, b = (np.asarray(jax.device_get(x), np.float32) for x in (a, b))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def timed(fn, *args, repeats=5, inner=5):
    return time_call(lambda: fn(*args), repeats=repeats, inner=inner)


def check() -> list[dict]:
    """Every scheme and plain-jit sharding on real GPUs, against one GPU."""
    devs = jax.devices()
    rows = []
    q, k, v, do = inputs(2, 4096, 8, 2, 128)
    with jax.default_device(devs[0]):
        ref = jax.device_get(fwd_bwd("auto")(q, k, v, do))
    n = len(devs)
    sp = Mesh(np.array(devs), ("sp",))
    for scheme in ("ring", "all_gather", "ulysses"):
        for balanced in (False, True):
            md = jaxattn.OperationMetadata(mesh=sp, context_parallel=scheme, load_balanced=balanced)
            lb = (lambda a: jaxattn.load_balance(a, n)) if balanced else (lambda a: a)
            ub = (lambda a: jaxattn.unload_balance(a, n)) if balanced else (lambda a: a)
            for backend in ("auto", "flash"):
                got = fwd_bwd(backend, md)(*(lb(x) for x in (q, k, v, do)))
                err = max(rel(ub(g), r) for g, r in zip(got, ref))
                rows.append(dict(part="check", what=f"cp {scheme} balanced={balanced} {backend}", grad_err=err))
                print(f"cp {scheme:10s} balanced={balanced!s:5s} {backend:6s} grad err {err:.1e}", flush=True)
    for axes, spec in ((("dp",), P("dp")), (("tp",), P(None, None, "tp"))):
        mesh = Mesh(np.array(devs), axes)
        sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v, do)]
        for backend in ("flash", "cudnn", "auto"):
            got = fwd_bwd(backend)(*sharded)
            err = max(rel(g, r) for g, r in zip(got, ref))
            rows.append(dict(part="check", what=f"plain jit {axes[0]} {backend}", grad_err=err,
                             sharding=str(got[0].sharding.spec)))
            print(f"plain jit {axes[0]} {backend:6s} grad err {err:.1e} dq sharding {got[0].sharding.spec}", flush=True)
    return rows


def plain() -> list[dict]:
    devs = jax.devices()
    b, s, hq, hkv, d = 8, 4096, 32, 8, 128
    q, k, v, do = inputs(b, s, hq, hkv, d)
    flops = BWD * attention_flops(b, s, s, hq, d, True)
    rows = []
    for backend in ("flash", "cudnn", "auto"):
        with jax.default_device(devs[0]):
            t1 = timed(fwd_bwd(backend), q, k, v, do)
        rows.append(dict(part="plain", backend=backend, setup="1 GPU", ms=1e3 * t1, tflops=flops / t1 / 1e12))
        print(f"{backend:6s} 1 GPU          {1e3 * t1:7.2f} ms {flops / t1 / 1e12:5.0f} TFLOP/s", flush=True)
        for axes, spec in ((("dp",), P("dp")), (("tp",), P(None, None, "tp"))):
            mesh = Mesh(np.array(devs), axes)
            sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v, do)]
            for setup, md in (("plain jit", None), ("metadata.mesh", jaxattn.OperationMetadata(mesh=mesh))):
                fn = fwd_bwd(backend, md)
                t = timed(fn, *sharded)
                out_spec = str(fn(*sharded)[0].sharding.spec)
                name = f"{len(devs)} GPU {axes[0]} {setup}"
                rows.append(dict(part="plain", backend=backend, setup=name, ms=1e3 * t, speedup=t1 / t,
                                 dq_sharding=out_spec))
                print(f"{backend:6s} {name:28s} {1e3 * t:7.2f} ms {t1 / t:5.2f}x  dq {out_spec}", flush=True)
    return rows


def cp(lengths: list[int], schemes: tuple[str, ...] = ("ring", "all_gather", "ulysses", "auto")) -> list[dict]:
    devs = jax.devices()
    n = len(devs)
    hq, hkv, d = 32, 8, 128
    mesh = Mesh(np.array(devs), ("sp",))
    rows = []
    for s in lengths:
        q, k, v, do = inputs(1, s, hq, hkv, d)
        flops = BWD * attention_flops(1, s, s, hq, d, True)
        try:
            with jax.default_device(devs[0]):
                t1 = timed(fwd_bwd("auto"), q, k, v, do, repeats=3, inner=2)
            rows.append(dict(part="cp", seq=s, scheme="1 GPU", ms=1e3 * t1, tokens_per_s=s / t1,
                             tflops=flops / t1 / 1e12))
            print(f"seq {s:6d} 1 GPU                  {1e3 * t1:8.1f} ms {s / t1:9.0f} tok/s "
                  f"{flops / t1 / 1e12:4.0f} TFLOP/s", flush=True)
        except Exception as err:  # noqa: BLE001 - a sequence one GPU cannot hold is a result too
            t1 = None
            print(f"seq {s:6d} 1 GPU failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}", flush=True)
        for scheme in schemes:
            for balanced in (False, True):
                md = jaxattn.OperationMetadata(mesh=mesh, context_parallel=scheme, load_balanced=balanced)
                sharding = NamedSharding(mesh, P(None, "sp"))
                args = [jax.device_put(jaxattn.load_balance(x, n) if balanced else x, sharding) for x in (q, k, v, do)]
                start = time.perf_counter()
                try:
                    t = timed(fwd_bwd("auto", md), *args, repeats=3, inner=2)
                except Exception as err:  # noqa: BLE001
                    print(f"seq {s:6d} {scheme} balanced={balanced} failed: {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:160]}", flush=True)
                    continue
                row = dict(part="cp", seq=s, scheme=scheme, balanced=balanced, ms=1e3 * t, tokens_per_s=s / t,
                           tflops=flops / t / 1e12, speedup=None if t1 is None else t1 / t,
                           wall_s=time.perf_counter() - start)
                if scheme == "auto":
                    split = jaxattn.select(q, k, v, is_causal=True, metadata=md).split
                    row["auto_picks"] = re.search(r"by (\w+) \(chosen by auto\)", split).group(1)
                rows.append(row)
                speed = "" if t1 is None else f"{t1 / t:5.2f}x"
                print(f"seq {s:6d} {scheme:10s} balanced={balanced!s:5s} {1e3 * t:8.1f} ms {s / t:9.0f} tok/s "
                      f"{flops / t / 1e12:4.0f} TFLOP/s {speed} {row.get('auto_picks', '')}", flush=True)
    return rows


def forward(metadata=None):
    """A jitted forward of causal attention (the output only)."""
    return jax.jit(lambda q, k, v: jaxattn.attention(q, k, v, is_causal=True, metadata=metadata))


def scale(lengths: list[int], counts: list[int] | None = None) -> list[dict]:
    """Context parallel on 1, 2, 4, 8... GPUs (as many as there are), forward and forward+backward,
    the best schemes and a 2-D (dp x sp) mesh; tokens/s and efficiency against one GPU at the
    longest length one GPU ran."""
    devs = jax.devices()
    counts = [n for n in (counts or [1, 2, 4, 8]) if n <= len(devs)]
    hq, hkv, d = 32, 8, 128
    rows: list[dict] = []
    for s in lengths:
        q, k, v, do = inputs(1, s, hq, hkv, d)
        flops = attention_flops(1, s, s, hq, d, True)
        for n in counts:
            setups = [("auto", False, None)] if n == 1 else [
                ("ulysses", False, None), ("ring", True, None), ("all_gather", True, None), ("auto", False, None)]
            if n >= 4:
                setups.append(("auto", False, 2))  # dp=2 x sp=n/2, batch 2
            for scheme, balanced, dp in setups:
                sp = n // (dp or 1)
                names = ("dp", "sp") if dp else ("sp",)
                mesh = Mesh(np.array(devs[:n]).reshape((dp, sp) if dp else (sp,)), names)
                md = None if n == 1 else jaxattn.OperationMetadata(mesh=mesh, context_parallel=scheme,
                                                                   load_balanced=balanced)
                batch = dp or 1
                spec = P("dp", "sp") if dp else P(None, "sp")
                with jax.default_device(devs[0]):
                    args = [jnp.concatenate([x] * batch) if batch > 1 else x for x in (q, k, v, do)]
                    if balanced:
                        args = [jaxattn.load_balance(x, sp) for x in args]
                if n > 1:
                    args = [jax.device_put(x, NamedSharding(mesh, spec)) for x in args]
                for kind, fn, work in (("fwd", forward(md), flops), ("fwd+bwd", fwd_bwd("auto", md), BWD * flops)):
                    try:
                        t = timed(fn, *(args[:3] if kind == "fwd" else args), repeats=3, inner=2)
                    except Exception as err:  # noqa: BLE001 - what does not fit is a result too
                        print(f"seq {s} {n} GPU {scheme} {kind} failed: {type(err).__name__}: "
                              f"{str(err).splitlines()[0][:160]}", flush=True)
                        continue
                    row = dict(part="scale", seq=s, gpus=n, scheme=scheme, balanced=balanced, dp=dp or 1,
                               kind=kind, ms=1e3 * t, tokens_per_s=batch * s / t, tflops=batch * work / t / 1e12)
                    rows.append(row)
                    print(f"seq {s:7d} {n} GPU {scheme:10s} bal={balanced!s:5s} dp={dp or 1} {kind:8s} "
                          f"{1e3 * t:9.1f} ms {batch * s / t:9.0f} tok/s {batch * work / t / 1e12:5.0f} TFLOP/s",
                          flush=True)
    single = [r for r in rows if r["gpus"] == 1]
    for kind in ("fwd", "fwd+bwd"):
        base = max((r for r in single if r["kind"] == kind), key=lambda r: r["seq"], default=None)
        if base is None:
            continue
        for r in rows:
            if r["kind"] == kind:
                r["speedup_vs_1gpu_longest"] = r["tokens_per_s"] / base["tokens_per_s"]
                r["efficiency"] = r["speedup_vs_1gpu_longest"] / r["gpus"]
    return rows


def main(argv: list[str]) -> None:
    part = argv[0] if argv else "check"
    print(f"# {part}: {len(jax.devices())} x {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    lengths = [int(a) for a in argv[1:] if a.isdigit()] or [32768]
    schemes = next((a.split("=", 1)[1].split(",") for a in argv[1:] if a.startswith("--schemes=")), None)
    counts = next(([int(c) for c in a.split("=", 1)[1].split(",")] for a in argv[1:] if a.startswith("--gpus=")),
                  None)
    parts = {
        "check": check,
        "plain": plain,
        "cp": lambda: cp(lengths, tuple(schemes) if schemes else ("ring", "all_gather", "ulysses", "auto")),
        "scale": lambda: scale(lengths, counts),
    }
    if part not in parts:
        raise SystemExit(f"part: expected one of {sorted(parts)}, got {part!r}")
    rows = parts[part]()
    path = os.path.join(os.environ.get("OUT", "."), f"distributed-{part}.json")
    with open(path, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "devices": len(jax.devices()), "jax": jax.__version__,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
