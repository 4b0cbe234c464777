"""Check and time the `flash` backend on one GPU, beside jax's Pallas mha and cuDNN.

    python3 bench/bench_flash.py check [real]     # conformance (bf16/fp16/fp32) + real shapes vs xla fp32
                                                  # ("real": only the real shapes, one short device call)
    python3 bench/bench_flash.py bench [--fwd-peers] [--no-peers]
                                                  # peers-table shapes: flash (Mosaic GPU forward and Triton
                                                  # forward, each with the Triton backward) beside jax's Pallas
                                                  # mha and cuDNN; window vs causal
    python3 bench/bench_flash.py tune KERNEL JSON # KERNEL fwd|bwd; JSON: list of config dicts

Timing as in the peers tables (bench/results/peers_H100_2026-11-22.md): median of 5
repetitions of 20 back-to-back calls after two warm-up calls, wall clock around
`block_until_ready`. FLOPs: 4·B·Hq·S²·D forward (halved when causal); forward+backward
counts 3.5× that. Results go to $OUT/*.json.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import OperationMetadata

OUT = os.environ.get("OUT", "/tmp")
SHAPES = [(4, 4096, 32, 32, 128), (4, 4096, 32, 8, 128), (1, 16384, 16, 16, 128), (8, 2048, 16, 16, 64)]


def log(*a):
    print(*a, flush=True)


def round_timer(f, *args, n=20):
    """Two warm-up calls, then (a function timing one round of `n` back-to-back calls, output)."""
    jax.block_until_ready(f(*args))
    out = f(*args)
    jax.block_until_ready(out)

    def once():
        t = time.perf_counter()
        for _ in range(n):
            res = f(*args)
        jax.block_until_ready(res)
        return (time.perf_counter() - t) / n

    return once, out


def timeit(f, *args, n=20, reps=5):
    """Median seconds per call over `reps` rounds, and the output."""
    once, out = round_timer(f, *args, n=n)
    return float(np.median([once() for _ in range(reps)])), out


def inputs(shape, dtype=jnp.bfloat16, seed=0):
    b, s, hq, hk, d = shape
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(k1, (b, s, hq, d), dtype)
    k = jax.random.normal(k2, (b, s, hk, d), dtype)
    v = jax.random.normal(k3, (b, s, hk, d), dtype)
    do = jax.random.normal(k4, (b, s, hq, d), dtype)
    return q, k, v, do


def rel(x, ref):
    x = jnp.asarray(x, jnp.float32)
    ref = jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def flash_fn(causal, window=None, config=None):
    md = OperationMetadata(operation_configs={"flash": config or {}})

    def f(q, k, v):
        return jaxattn.attention(q, k, v, is_causal=causal, sliding_window=window, backend="flash", metadata=md)

    return f


def peer_fns(shape, causal):
    from jax.experimental.pallas.ops.gpu import attention as tri

    b, s, hq, hk, d = shape
    sc = 1 / np.sqrt(d)

    def mha(q, k, v):
        if hq != hk:
            k = jnp.repeat(k, hq // hk, 2)
            v = jnp.repeat(v, hq // hk, 2)
        return tri.mha(q, k, v, None, sm_scale=sc, causal=causal)

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")

    return {"jax_pallas_mha": mha, "cudnn": cudnn}


def time_modes(name, fn, q, k, v, do, flops, row, modes=("fwd", "fwdbwd")):
    for mode in modes:
        try:
            if mode == "fwd":
                dt, _ = timeit(jax.jit(fn), q, k, v)
                tf = flops / dt / 1e12
            else:
                dt, _ = timeit(jax.jit(lambda q, k, v: jax.vjp(fn, q, k, v)[1](do)), q, k, v)
                tf = 3.5 * flops / dt / 1e12
            row[f"{name}/{mode}"] = (dt * 1e3, tf)
            log(f"  {name:16s} {mode:6s} {dt * 1e3:8.3f} ms {tf:7.1f} TFLOP/s")
        except Exception as e:  # noqa: BLE001
            row[f"{name}/{mode}"] = None
            log(f"  {name:16s} {mode:6s} FAIL {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")


# -- check ------------------------------------------------------------------------------


def check_cases():
    """Conformance cases on small shapes (the GPU tests run the whole matrix)."""
    from jaxattn.testing import Shape, all_cases, check_case
    from jaxattn_flash import FlashAttention

    hw = jaxattn.hardware.current()
    log("hardware", hw)
    impl = FlashAttention()
    cases = {c.name: c for c in all_cases("attention")}
    d64 = Shape(batch=2, seq=256, num_heads=4, head_dim=64)
    runs = [("bfloat16", d64, n) for n in ("causal", "gqa", "mqa", "sliding_window", "sliding_window_asym",
                                           "chunked_causal", "segment_ids", "seq_lengths", "soft_cap", "sinks",
                                           "fully_masked_rows", "return_lse", "value_head_dim", "decode",
                                           "causal_q_lt_kv", "causal_top_left")]
    runs += [("float16", d64, "gqa"), ("float32", d64, "causal"), ("float32", d64, "segment_ids"),
             ("bfloat16", Shape(batch=1, seq=384, num_heads=4, head_dim=128), "gqa"),
             ("bfloat16", Shape(batch=1, seq=200, num_heads=2, head_dim=96), "causal_q_lt_kv"),
             ("bfloat16", Shape(batch=1, seq=256, num_heads=2, head_dim=256), "gqa")]
    for dtype, shape, name in runs:
        t = time.time()
        r = check_case(impl, cases[name], hardware=hw, dtype=dtype, shape=shape)
        log(f"{r.line()}  [d={shape.head_dim} seq={shape.seq}, {time.time() - t:.1f} s]")


def check_real():
    """Real shapes through `auto`'s path, bf16 against the xla backend in float32 (forward; and
    gradients up to 4096 tokens)."""
    log("hardware", jaxattn.hardware.current())
    for shape, causal, window in (((4, 4096, 32, 8, 128), True, None), ((4, 4096, 32, 32, 128), False, None),
                                  ((8, 2048, 16, 16, 64), False, None), ((8, 2048, 16, 16, 64), True, None),
                                  ((2, 4096, 16, 4, 256), True, None), ((1, 16384, 16, 16, 128), True, 1024)):
        t = time.time()
        q, k, v, do = inputs(shape)
        f = flash_fn(causal, window)
        ref = jax.jit(lambda q, k, v, causal=causal, window=window: jaxattn.attention(
            q, k, v, is_causal=causal, sliding_window=window, backend="xla"))
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        out = jax.jit(f)(q, k, v)
        r = ref(*f32)
        log(f"real {shape} causal={causal} window={window}: out err {rel(out, r):.2e}")
        if shape[1] <= 4096:
            g = jax.jit(lambda q, k, v, f=f, do=do: jax.vjp(f, q, k, v)[1](do))(q, k, v)
            gr = jax.jit(lambda q, k, v, ref=ref, do=do: jax.vjp(ref, q, k, v)[1](do.astype(jnp.float32)))(*f32)
            log("   grads err " + " ".join(f"{n}={rel(a, b):.2e}" for n, a, b in zip(("dq", "dk", "dv"), g, gr)))
        log(f"   [{time.time() - t:.1f} s]")


# -- bench ------------------------------------------------------------------------------


KERNELS = {"flash_mosaic": {"gpu_kernel": "mosaic"}, "flash_triton": {"gpu_kernel": "triton"}}


def bench(peers=True, peer_modes=("fwd", "fwdbwd")):
    rows = []
    for shape in SHAPES:
        for causal in (False, True):
            b, s, hq, hk, d = shape
            q, k, v, do = inputs(shape)
            flops = 4 * b * hq * s * s * d * (0.5 if causal else 1.0)
            log(f"{shape} causal={causal}")
            row = {"shape": shape, "causal": causal}
            for name, cfg in KERNELS.items():
                time_modes(name, flash_fn(causal, config=cfg), q, k, v, do, flops, row)
            if peers:
                for name, fn in peer_fns(shape, causal).items():
                    time_modes(name, fn, q, k, v, do, flops, row, peer_modes)
            rows.append(row)
    # sliding window 1024 vs full causal at 16k (FLOPs: those of full causal, so the ratio is the speed-up)
    shape = (1, 16384, 16, 16, 128)
    q, k, v, do = inputs(shape)
    flops = 4 * 16 * 16384 * 16384 * 128 * 0.5
    row = {"shape": shape, "causal": "window1024"}
    log(f"{shape} causal + sliding_window=1024 (TFLOP/s counted as full causal)")
    for name, cfg in KERNELS.items():
        time_modes(name, flash_fn(True, window=(1024, 0), config=cfg), q, k, v, do, flops, row)
    rows.append(row)
    json.dump(rows, open(os.path.join(OUT, "bench.json"), "w"), indent=1)
    return rows


def tune(kernel, variants, shapes=None):
    rows = []
    for shape, causal in shapes or [((4, 4096, 32, 32, 128), False), ((4, 4096, 32, 32, 128), True),
                                    ((8, 2048, 16, 16, 64), True)]:
        b, s, hq, hk, d = shape
        q, k, v, do = inputs(shape)
        flops = 4 * b * hq * s * s * d * (0.5 if causal else 1.0)
        log(f"tune {kernel} {shape} causal={causal}")
        for cfg in variants:
            if cfg.get("d") not in (None, d):
                continue
            cfg = {kk: vv for kk, vv in cfg.items() if kk != "d"}
            fn = flash_fn(causal, config=cfg)
            try:
                if kernel == "fwd":
                    dt, _ = timeit(jax.jit(fn), q, k, v, n=10, reps=3)
                    tf = flops / dt / 1e12
                else:
                    dt, _ = timeit(jax.jit(lambda q, k, v, fn=fn, do=do: jax.vjp(fn, q, k, v)[1](do)),
                                   q, k, v, n=10, reps=3)
                    tf = 3.5 * flops / dt / 1e12
                log(f"  {json.dumps(cfg):100s} {dt * 1e3:8.3f} ms {tf:7.1f} TFLOP/s")
                rows.append(dict(shape=shape, causal=causal, kernel=kernel, config=cfg, ms=dt * 1e3, tflops=tf))
            except Exception as e:  # noqa: BLE001
                msg = str(e).splitlines()[0][:300] if str(e) else ""
                log(f"  {json.dumps(cfg):100s} FAIL {type(e).__name__}: {msg}")
    with open(os.path.join(OUT, f"tune_{kernel}.json"), "a") as fh:
        json.dump(rows, fh)
    return rows


if __name__ == "__main__":
    log("jax", jax.__version__, jax.devices())
    what = sys.argv[1] if len(sys.argv) > 1 else "bench"
    if what == "check":
        if sys.argv[2:3] != ["real"]:
            check_cases()
        check_real()
    elif what == "bench":
        bench(peers="--no-peers" not in sys.argv,
              peer_modes=("fwd",) if "--fwd-peers" in sys.argv else ("fwd", "fwdbwd"))
    elif what == "tune":
        arg = sys.argv[3]
        shapes = [(tuple(sh), bool(c)) for sh, c in json.loads(sys.argv[4])] if len(sys.argv) > 4 else None
        tune(sys.argv[2], json.load(open(arg)) if os.path.exists(arg) else json.loads(arg), shapes)
    else:
        raise SystemExit(__doc__)
