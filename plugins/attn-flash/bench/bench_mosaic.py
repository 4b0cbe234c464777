"""Check and tune the Mosaic GPU forward kernel (Hopper) directly, beside the Triton forward.

    python3 bench/bench_mosaic.py smoke [all]   # small shapes, every mask/head_dim/dtype, vs xla in float32
    python3 bench/bench_mosaic.py tune [nopp]   # kernel variants on the peers-table shapes (TFLOP/s, error vs Triton)

Timing as in bench_flash.py (median of 5 x 20 back-to-back calls after two warm-ups).
Results go to $OUT/*.json.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp

import jaxattn
from jaxattn_flash.mosaic_kernels import MosaicSpec, mosaic_forward

sys.path.insert(0, os.path.dirname(__file__))
from bench_flash import OUT, SHAPES, inputs, log, rel, timeit  # noqa: E402


def reference(q, k, v, band):
    """out, lse of the xla backend in float32 for a band (lo, hi) mask."""
    lo, hi = band
    mask = None
    if lo is not None or hi is not None:
        mask = jaxattn.SlidingWindowMask(-lo if lo is not None else None, hi) if lo is not None else \
            jaxattn.CausalMask(hi)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    return jax.jit(lambda q, k, v: jaxattn.attention(q, k, v, mask=mask, return_lse=True, backend="xla"))(*f32)


def smoke(everything: bool):
    cases = [  # (b, q_len, kv_len, hq, hkv, d), band, dtype, spec changes
        ((1, 256, 256, 2, 2, 64), (None, None), jnp.bfloat16, {}),
    ]
    if everything:
        for d in (64, 128, 256):
            bk = 64 if d == 256 else 128
            for band in ((None, None), (None, 0), (-96, 0), (-64, 32)):
                cases.append(((2, 512, 512, 4, 2, d), band, jnp.bfloat16, dict(block_kv=bk)))
        cases += [
            ((2, 256, 512, 4, 1, 128), (None, 256), jnp.bfloat16, {}),   # causal, q_len < kv_len (bottom-right)
            ((1, 384, 256, 4, 2, 64), (None, -128), jnp.bfloat16, {}),   # causal, q_len > kv_len: rows without keys
            ((2, 512, 512, 4, 2, 64), (None, 0), jnp.float16, {}),
            ((2, 512, 512, 4, 2, 128), (None, None), jnp.float16, {}),
            ((2, 512, 512, 4, 2, 128), (None, 0), jnp.bfloat16, dict(pingpong=False)),
            ((2, 512, 512, 4, 2, 128), (None, 0), jnp.bfloat16, dict(fence=False)),
            ((2, 512, 512, 4, 2, 128), (None, 0), jnp.bfloat16, dict(block_kv=64, stages=4)),
            ((2, 512, 512, 4, 2, 64), (None, None), jnp.bfloat16, dict(block_kv=256, stages=3)),
        ]
    for shape, band, dtype, changes in cases:
        b, sq, skv, hq, hkv, d = shape
        ks = jax.random.split(jax.random.key(sq + skv + d), 3)
        q = jax.random.normal(ks[0], (b, sq, hq, d), dtype)
        k = jax.random.normal(ks[1], (b, skv, hkv, d), dtype)
        v = jax.random.normal(ks[2], (b, skv, hkv, d), dtype)
        spec = MosaicSpec(scale=d ** -0.5, band_lo=band[0], band_hi=band[1], **changes)
        t = time.time()
        try:
            out, lse = jax.jit(lambda q, k, v, spec=spec: mosaic_forward(spec, q, k, v))(q, k, v)
            out.block_until_ready()
            ref, ref_lse = reference(q, k, v, band)
            live = jnp.isfinite(ref_lse)
            lse_ok = bool(jnp.all(jnp.isfinite(lse) == live))
            lse_err = float(jnp.max(jnp.where(live, jnp.abs(lse - ref_lse), 0.0)))
            log(f"smoke {shape} band={band} {jnp.dtype(dtype).name} {changes}: out {rel(out, ref):.2e} "
                f"lse maxabs {lse_err:.2e} dead rows match {lse_ok} nan {bool(jnp.isnan(out).any())} "
                f"[{time.time() - t:.1f} s]")
        except Exception as e:  # noqa: BLE001
            log(f"smoke {shape} band={band} {changes}: FAIL {type(e).__name__}: {str(e)[:600]}")


def tune(no_pingpong: bool = False):
    from bench_flash import flash_fn

    variants = {128: [dict(), dict(fence=True), dict(pingpong=False), dict(block_kv=64, stages=3),
                      dict(block_kv=64, stages=4)],
                64: [dict(), dict(stages=3), dict(stages=4), dict(block_kv=256, stages=2), dict(pingpong=False),
                     dict(block_kv=64, stages=4)]}
    rows = []
    for shape in SHAPES:
        b, s, hq, hk, d = shape
        q, k, v, _ = inputs(shape)
        for causal in (False, True):
            flops = 4 * b * hq * s * s * d * (0.5 if causal else 1.0)
            tri = jax.jit(flash_fn(causal, config={"gpu_kernel": "triton"}))
            dt, ref = timeit(tri, q, k, v)
            log(f"{shape} causal={causal}: triton {flops / dt / 1e12:6.1f} TFLOP/s")
            rows.append(dict(shape=shape, causal=causal, variant="triton", tflops=flops / dt / 1e12))
            for ch in variants[d]:
                ch = {**ch, "pingpong": False} if no_pingpong else ch
                spec = MosaicSpec(scale=d ** -0.5, band_lo=None, band_hi=0 if causal else None, **ch)
                try:
                    f = jax.jit(lambda q, k, v, spec=spec: mosaic_forward(spec, q, k, v)[0])
                    dt, out = timeit(f, q, k, v)
                    tf = flops / dt / 1e12
                    log(f"   mosaic {json.dumps(ch):40s} {tf:6.1f} TFLOP/s  err vs triton {rel(out, ref):.2e}")
                    rows.append(dict(shape=shape, causal=causal, variant=ch, tflops=tf))
                except Exception as e:  # noqa: BLE001
                    log(f"   mosaic {json.dumps(ch):40s} FAIL {type(e).__name__}: {str(e)[:300]}")
        json.dump(rows, open(os.path.join(OUT, "tune_mosaic.json"), "w"), indent=1)


if __name__ == "__main__":
    log("jax", jax.__version__, jax.devices())
    what = sys.argv[1] if len(sys.argv) > 1 else "smoke"
    if what == "smoke":
        smoke("all" in sys.argv[2:])
    elif what == "tune":
        tune(no_pingpong="nopp" in sys.argv[2:])
    else:
        raise SystemExit(__doc__)
