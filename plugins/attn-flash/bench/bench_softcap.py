"""Forms of the bounded soft-capped Mosaic forward side by side (issue 22's bar: soft-cap within 5%
of the plain causal forward).

    python3 plugins/attn-flash/bench/bench_softcap.py fwd [CYCLES [FORMS]]  # TFLOP/s of each form
    python3 plugins/attn-flash/bench/bench_softcap.py train [CYCLES]        # fwd+bwd, plain vs capped
    MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO=DIR \\
        python3 plugins/attn-flash/bench/bench_softcap.py compile FORM  # one form's PTX and ptxas report

Forms: the plain causal forward (no cap); all exp2 on the special-function unit ("mufu"); one in
N on the FMA pipe by the cubic with cap·log2(e) fused into its rounding ("fused 1/N") or multiplied
first ("unfused 1/3", the form before 2026-12-03's sixth session), or by the quadratic ("deg2 1/N":
1.8e-3 relative, under bfloat16's half step; "deg2 1/2" is the default since that session); and
the cubic with other tiles, stages and launch clusters (FORMS: comma-separated names, default
all). Each form's output against the all-MUFU form's, then medians of CYCLES samples taken in turn
(`jaxattn.bench.time_side_by_side`). `train` times forward+backward through `jaxattn.attention`
(flash, its default configs): plain causal, the cap with its default, with the cubic on a third or
a quarter, all on the special-function unit, and with the backward's exp2 split too
(`mosaic_poly_exp2_bwd`: the quadratic on half, the cubic on a third; and plain causal with it).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import replace

import jax
import jax.numpy as jnp
from bench_guard import forms_side_by_side, random_qkv, spec_for

import jaxattn
from jaxattn_flash import mosaic_exp2
from jaxattn_flash import mosaic_kernels as mk

CYCLES = 15
CAP = 50.0
SHAPES = [(1, 32768, 32, 8, 128), (4, 4096, 32, 8, 128), (1, 16384, 16, 16, 128)]  # causal: issue 22's row, the table's


def unfused(plgpu, x, every, scale=1.0, degree=3):
    """The form before the fused scale: z = scale·x as its own multiply, then the split on z."""
    return mosaic_exp2.split_exp2(plgpu, x * scale, every, degree=degree)


CUBIC, QUADRATIC = {"poly_degree": 3}, {"poly_degree": 2}
FORMS = {  # name: (MosaicSpec changes, replacement of mosaic_kernels.split_exp2 or None)
    "mufu": ({"poly_exp2": 0}, None),
    "unfused 1/3": ({"poly_exp2": 3, **CUBIC}, unfused),
    "fused 1/3": ({"poly_exp2": 3, **CUBIC}, None),
    "fused 1/2": ({"poly_exp2": 2, **CUBIC}, None),
    "fused 1/4": ({"poly_exp2": 4, **CUBIC}, None),
    "deg2 1/3": ({"poly_exp2": 3, **QUADRATIC}, None),
    "deg2 1/2": ({"poly_exp2": 2, **QUADRATIC}, None),
    "deg2 1/4": ({"poly_exp2": 4, **QUADRATIC}, None),
    "fused 1/3 kv64": ({"poly_exp2": 3, "block_kv": 64, **CUBIC}, None),
    "fused 1/3 kv64 3 stages": ({"poly_exp2": 3, "block_kv": 64, "stages": 3, **CUBIC}, None),
    "fused 1/3 cluster 1": ({"poly_exp2": 3, "cluster": 1, **CUBIC}, None),
    "fused 1/3 cluster 8": ({"poly_exp2": 3, "cluster": 8, **CUBIC}, None),
}


@contextlib.contextmanager
def exp2_form(split):
    saved = mk.split_exp2
    mk.split_exp2 = split or saved
    try:
        yield
    finally:
        mk.split_exp2 = saved


def build(spec, form, q, k, v):
    """A jitted forward of `form`, traced and compiled now (the replacement lives while tracing)."""
    changes, split = FORMS[form]
    changed = replace(spec, **changes)
    fn = jax.jit(lambda q, k, v: mk.mosaic_forward(changed, q, k, v))
    with exp2_form(split):
        jax.block_until_ready(fn(q, k, v))
    return fn


def forward(cycles: int, forms: list[str]) -> None:
    for shape in SHAPES:
        b, s, hq, _, d = shape
        q, k, v = random_qkv(shape)
        mask = jaxattn.CausalMask()
        spec = spec_for(q, k, v, mask, CAP)
        label = f"{shape} causal soft-cap {CAP:g} (default spec: poly_exp2={spec.poly_exp2} cluster={spec.cluster})"
        if not spec.bounded_logits:
            print(f"SKIP {label}: not bounded")
            continue
        plain = spec_for(q, k, v, mask)
        fns = {"plain (no cap)": jax.jit(lambda q, k, v, p=plain: mk.mosaic_forward(p, q, k, v))}
        for form in ["mufu"] + [f for f in forms if f != "mufu"]:
            try:
                fns[form] = build(spec, form, q, k, v)
            except Exception as e:  # noqa: BLE001 - a form that cannot compile is a line
                print(f"FAIL {label} {form}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        forms_side_by_side(f"{label} fwd", fns, (q, k, v), 4 * b * hq * d * s * (s + 1) / 2, cycles,
                           names=[f for f in forms if f in fns])


def train(cycles: int) -> None:
    """Forward+backward through `attention`, side by side: TFLOP/s (3.5x the forward's visible pairs)."""
    cubic = {"mosaic_poly_degree": 3}
    configs = {"plain": (None, {}), "soft-cap": (CAP, {}),
               "soft-cap cubic 1/3": (CAP, {"mosaic_poly_exp2": 3, **cubic}),
               "soft-cap cubic 1/4": (CAP, {"mosaic_poly_exp2": 4, **cubic}),
               "soft-cap mufu": (CAP, {"mosaic_poly_exp2": 0}),
               "soft-cap, bwd 1/2": (CAP, {"mosaic_poly_exp2_bwd": 2}),
               "soft-cap, bwd cubic 1/3": (CAP, {"mosaic_poly_exp2_bwd": 3, **cubic}),
               "plain, bwd 1/2": (None, {"mosaic_poly_exp2_bwd": 2})}
    for shape in SHAPES:
        b, s, hq, _, d = shape
        q, k, v = random_qkv(shape)
        do = jax.random.normal(jax.random.key(7), q.shape, q.dtype)
        fns = {}
        for name, (cap, config) in configs.items():
            md = jaxattn.OperationMetadata(operation_configs={"flash": config})

            def loss(q, k, v, do, cap=cap, md=md):
                out = jaxattn.attention(q, k, v, is_causal=True, logits_soft_cap=cap, backend="flash", metadata=md)
                return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))

            fns[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        forms_side_by_side(f"{shape} causal fwd+bwd", fns, (q, k, v, do), 3.5 * 4 * b * hq * d * s * (s + 1) / 2,
                           cycles, names=[], base="plain")


def compile_form(form: str) -> None:
    """Trace and compile one form's kernel at a small shape (for Mosaic GPU's dumps)."""
    shape = (1, 1024, 2, 1, 128)
    q, k, v = random_qkv(shape)
    spec = spec_for(q, k, v, jaxattn.CausalMask(), CAP)
    if form == "plain (no cap)":
        jax.block_until_ready(mk.mosaic_forward(spec_for(q, k, v, jaxattn.CausalMask()), q, k, v))
    else:
        build(spec, form, q, k, v)


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "fwd"
    print(f"jax {jax.__version__} {jax.devices()[0].device_kind}", flush=True)
    cycles = int(sys.argv[2]) if len(sys.argv) > 2 and mode in ("fwd", "train") else CYCLES
    if mode == "fwd":
        forward(cycles, sys.argv[3].split(",") if len(sys.argv) > 3 else list(FORMS))
    elif mode == "train":
        train(cycles)
    elif mode == "compile":
        compile_form(sys.argv[2])
    else:
        raise SystemExit(__doc__)
