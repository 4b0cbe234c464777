"""The soft-capped Mosaic forward with part of its exp2 on the FMA pipe (`MosaicSpec.poly_exp2`,
mosaic_exp2), beside the all-MUFU form and the plain causal forward of the same shape (issue 22's
bar: soft-cap within 5% of plain causal).

    python3 plugins/attn-flash/bench/bench_poly_exp2.py [CYCLES]

Written on 2026-12-03 without a GPU (lowered for CUDA on CPU only); this script is its first check.
For each shape: the relative difference of each form's output from the all-MUFU form's (the cubic's
error is below 7.5e-5 before P is rounded to bfloat16), the NaN rows of a poly form on inputs with
non-finite values against xla, then TFLOP/s of visible work (medians of CYCLES samples taken in
turn, `jaxattn.bench.time_side_by_side`).
"""

from __future__ import annotations

import sys
from dataclasses import replace

import jax
import jax.numpy as jnp
from bench_guard import forms_side_by_side, nan_verdict, random_qkv, spec_for

import jaxattn
from jaxattn.testing import nonfinite_problem
from jaxattn_flash.mosaic_kernels import mosaic_forward

CYCLES = 15
CAP = 50.0
SHAPES = [((1, 32768, 32, 8, 128), True), ((4, 4096, 32, 8, 128), True), ((1, 16384, 16, 16, 128), False),
          ((4, 4096, 32, 8, 128), False), ((8, 2048, 16, 16, 64), True), ((2, 8192, 16, 8, 256), True)]
# the first run (2026-12-03) had 1/8, and 1/2 with the (since removed) intra-warpgroup overlap: both slower than 1/3
# the cubic, as timed then (the quadratic and the fused scale came after: bench_softcap.py)
POLY_FORMS = {"mufu": {"poly_exp2": 0}, "poly 1/2": {"poly_exp2": 2, "poly_degree": 3},
              "poly 1/3": {"poly_exp2": 3, "poly_degree": 3}, "poly 1/4": {"poly_exp2": 4, "poly_degree": 3}}


def kernel(spec, **changes):
    changed = replace(spec, **changes)
    return jax.jit(lambda q, k, v: mosaic_forward(changed, q, k, v))


def check_nan_rows() -> None:
    x = nonfinite_problem(0, (2, 1024, 4, 2, 128), bad_keys=False, dtype=jnp.bfloat16)
    q, k, v = x["query"], x["key"], x["value"]
    mask = jaxattn.CausalMask()
    spec = replace(spec_for(q, k, v, mask, CAP), poly_exp2=2, poly_degree=3)  # guarded: the retry guard's two passes
    out, lse = kernel(spec)(q, k, v)
    ref, ref_lse = jaxattn.attention(*(t.astype(jnp.float32) for t in (q, k, v)), mask=mask, backend="xla",
                                     return_lse=True, logits_soft_cap=CAP)
    print(f"NAN poly 1/2 bounded={spec.bounded_logits}: {nan_verdict(out, lse, ref, ref_lse, 'poly 1/2')}", flush=True)


def timing(cycles: int) -> None:
    for shape, causal in SHAPES:
        b, s, hq, hkv, d = shape
        q, k, v = random_qkv(shape)
        mask = jaxattn.CausalMask() if causal else None
        spec = spec_for(q, k, v, mask, CAP)
        label = f"{shape} {'causal' if causal else 'full'} soft-cap {CAP:g} bounded={spec.bounded_logits}"
        if not spec.bounded_logits:
            print(f"SKIP {label}: poly_exp2 needs bounded logits")
            continue
        fns = {name: kernel(spec, **changes) for name, changes in POLY_FORMS.items()}
        fns["plain (no cap)"] = kernel(spec_for(q, k, v, mask))
        fns["default"] = kernel(spec)
        flops = 4 * b * hq * d * (s * (s + 1) / 2 if causal else s * s)
        forms_side_by_side(f"{label} fwd", fns, (q, k, v), flops, cycles, names=list(POLY_FORMS))


if __name__ == "__main__":
    print("jax", jax.__version__, jax.devices()[0].device_kind)
    check_nan_rows()
    timing(int(sys.argv[1]) if len(sys.argv) > 1 else CYCLES)
