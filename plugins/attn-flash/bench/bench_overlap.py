"""The Mosaic forward's two ways of hiding a tile's softmax on a Hopper GPU, side by side:
"ping-pong" (the default: each consumer warpgroup's softmax runs while the other's products do),
"overlap" (`MosaicSpec.overlap`: tile ki + 1's QKᵀ runs while tile ki's softmax does, in the same
warpgroup, FlashAttention-3's intra-warpgroup overlap; ping-pong off in those blocks) and
"neither", beside tokamax's default on the causal rows.

    python3 plugins/attn-flash/bench/bench_overlap.py [CYCLES]
    MOSAIC_GPU_DUMP_PTXAS=1 python3 plugins/attn-flash/bench/bench_overlap.py 1 2>&1 | grep -i -e spill -e serializ

(the second: whether ptxas spills the overlapped loop's registers, two tiles of logits beside the
accumulator, or serializes its wgmma instructions, which would undo the overlap).

Written on 2026-12-03 without a GPU (lowered for CUDA on CPU only); this script is its first check.
Each form computes the same tiles in the same order, so its output must be bitwise that of the
default ("SAME" lines; "DIFF" gives the relative difference where it is not). Then each form's
NaN rows against xla on inputs with non-finite values (the retry guard's first pass runs the
overlapped loop), then TFLOP/s of visible work (medians of CYCLES samples taken in turn,
`jaxattn.bench.time_side_by_side`) on the peers' shapes, causal and not, and soft-cap 50 at
(1, 32768, 32 q / 8 kv, 128) causal (issue 22's row: the softmax is longest there).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import replace

import jax
import jax.numpy as jnp
from bench_guard import mask_for, spec_for, tokamax_forward

import jaxattn
from jaxattn.bench import time_side_by_side
from jaxattn.testing import assert_same_nonfinite, nonfinite_problem
from jaxattn_flash.mosaic_kernels import mosaic_forward

CYCLES = 15
SHAPES = [  # (b, s, hq, hkv, d), causal, soft-cap
    ((4, 4096, 32, 8, 128), True, None), ((1, 16384, 16, 16, 128), True, None), ((8, 2048, 16, 16, 64), True, None),
    ((4, 4096, 32, 8, 128), False, None), ((1, 16384, 16, 16, 128), False, None),
    ((1, 32768, 32, 8, 128), True, 50.0),
]


def forms(q, k, v, causal: bool, soft_cap):
    """name -> jitted (q, k, v) -> (out, lse): the flash backend's own Mosaic spec for this call, changed."""
    spec = spec_for(q, k, v, jaxattn.CausalMask() if causal else None, soft_cap)

    def kernel(**changes):
        changed = replace(spec, **changes)
        return jax.jit(lambda q, k, v: mosaic_forward(changed, q, k, v))

    tokamax = tokamax_forward() if causal and soft_cap is None else None
    return {
        "ping-pong": kernel(),
        "overlap": kernel(overlap=True),
        "neither": kernel(pingpong=False),
        **({"tokamax": tokamax} if tokamax is not None else {}),
    }


def check_nan_rows() -> None:
    for shape, window in (((2, 1024, 4, 2, 128), None), ((2, 2048, 4, 2, 128), 384)):
        x = nonfinite_problem(0, shape, bad_keys=False, dtype=jnp.bfloat16)
        q, k, v = x["query"], x["key"], x["value"]
        mask = mask_for(window)
        spec = replace(spec_for(q, k, v, mask), overlap=True)
        out, lse = jax.jit(functools.partial(mosaic_forward, spec))(q, k, v)
        ref, ref_lse = jaxattn.attention(*(t.astype(jnp.float32) for t in (q, k, v)), mask=mask, backend="xla",
                                         return_lse=True)
        try:
            assert_same_nonfinite(out, lse, ref, ref_lse, f"overlap {shape} window={window}", rtol=3e-2, atol=3e-2)
            verdict = "ok"
        except AssertionError as err:
            verdict = f"FAIL {str(err)[:300]}"
        print(f"NAN {shape} window={window} overlap: {verdict}", flush=True)


def timing(cycles: int) -> None:
    for shape, causal, soft_cap in SHAPES:
        b, s, hq, hkv, d = shape
        ks = jax.random.split(jax.random.key(s + d), 3)
        q = jax.random.normal(ks[0], (b, s, hq, d), jnp.bfloat16)
        k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.bfloat16)
        v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.bfloat16)
        flops = 4 * b * hq * d * (s * (s + 1) / 2 if causal else s * s)
        fns = forms(q, k, v, causal, soft_cap)
        label = f"{shape} {'causal' if causal else 'full'}{f' soft-cap {soft_cap:g}' if soft_cap else ''}"
        ref_out, ref_lse = fns["ping-pong"](q, k, v)
        for name in ("overlap", "neither"):
            out, lse = fns[name](q, k, v)
            if bool(jnp.array_equal(out, ref_out)) and bool(jnp.array_equal(lse, ref_lse)):
                print(f"SAME {label} {name}")
            else:
                err = float(jnp.linalg.norm((out - ref_out).astype(jnp.float32))
                            / jnp.linalg.norm(ref_out.astype(jnp.float32)))
                print(f"DIFF {label} {name}: {err:.1e}")
        seconds, failed = time_side_by_side({n: functools.partial(f, q, k, v) for n, f in fns.items()},
                                            repeats=cycles)
        tflops = {n: flops / t / 1e12 for n, t in seconds.items()}
        tflops.update({n: float("nan") for n in failed})
        print(f"FORMS {label} fwd TFLOP/s: " + "  ".join(f"{n} {t:.0f}" for n, t in tflops.items()), flush=True)


if __name__ == "__main__":
    print("jax", jax.__version__, jax.devices()[0].device_kind)
    check_nan_rows()
    timing(int(sys.argv[1]) if len(sys.argv) > 1 else CYCLES)
