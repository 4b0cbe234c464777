"""exp2 of a logit tile with part of it computed on the FMA pipe (FlashAttention-4's trick).

A soft-capped forward spends two special-function (MUFU) instructions per logit, tanh and exp2,
and a Hopper SM issues 16 of those a cycle against 128 float32 FMAs: the softmax of a 128-key
tile then takes about as long as the other warpgroup's two products, so the ping-pong no longer
hides it. `split_exp2` takes one value in every `every` of each thread's registers off the MUFU
unit: 2^z = 2^round(z) · 2^f with f in [-1/2, 1/2], 2^f by a polynomial and 2^round(z) added to
its exponent bits. The rounding is the 1.5·2^23 trick: z + 1.5·2^23 holds round(z) in its low
mantissa bits, so shifting the sum's bits left by 23 gives round(z) · 2^23, the exponent
increment, with no float-to-int conversion (which issues on a slow pipe). The forward's
cap·log2(e) is fused into that rounding and the fraction (two FMAs), one multiply less per value.

Two polynomials (`POLYNOMIALS`): the cubic's relative error is below 7.5e-5, the quadratic's below
1.8e-3, under bfloat16's half step (1.95e-3) of the P that P·V reads, so P stays within one step
of exact; but the row sums are float32, and a row of few keys carries the quadratic's error into
its lse (up to 1.8e-3, where MUFU's exp2 leaves about 2^-22). The default, half of the values by the
quadratic (`config.MOSAIC_POLY_EXP2`, `MOSAIC_POLY_DEGREE`), was the one form within 5% of the
plain causal forward in every run at (1, 32768, 32/8, 128) on an H200 (0.957–0.960; a third by the
cubic 0.92); outputs differ from the all-MUFU form's by 2.5e-3 relative (the cubic's 7.5e-4).

Only for z within [-125, 125] (2^f's exponent plus round(z) must stay normal): the bounded
soft-capped logits (|z| <= cap·log2(e), `MosaicSpec.bounded_logits`) are. A NaN stays NaN; -inf
does not give 0, so the caller masks p, not z. Splitting the tile by key columns instead, with a
second P·V product for them, was slower (flash BENCHMARKS.md).
"""

from __future__ import annotations

import numpy as np

POLY_EXP2 = (0.9999281, 0.69326097, 0.24261081, 0.05517143)  # 2^f on [-1/2, 1/2], minimax relative error
POLY_EXP2_QUADRATIC = (1.0004423, 0.70342714, 0.23841788)  # the same, one degree less
POLYNOMIALS = {3: POLY_EXP2, 2: POLY_EXP2_QUADRATIC}  # degree -> coefficients, constant first
POLY_ERROR = {3: 7.5e-5, 2: 1.8e-3}  # degree -> bound of their relative error over [-1/2, 1/2]
ROUNDER = 12582912.0  # 1.5·2^23: float32 addition of it rounds to an integer held in the low bits
FLUSH_BELOW = -125.0  # with `flush`: 2^z below 2^-125 is 0 (MUFU's ftz exp2 flushes from -126)


def check_degree(owner: str, degree: int) -> None:
    """Raise ValueError naming `owner` unless `degree` names one of `POLYNOMIALS`."""
    if degree not in POLYNOMIALS:
        raise ValueError(f"{owner}: poly_degree must be one of {sorted(POLYNOMIALS)}, got {degree!r}")


def _hex(x: float) -> str:
    return f"0f{int(np.float32(x).view(np.uint32)):08X}"


def poly_exp2_ptx(scale: float = 1.0, degree: int = 3, flush: bool = False) -> str:
    """PTX for $0 = 2^(scale·$1) on the FMA and integer pipes. With a scale the product is fused into
    the rounding and the fraction (fma: the exact product, one rounding), one multiply less than
    scaling first. `flush` (scale 1 only) makes it 0 for $1 below FLUSH_BELOW, -inf included (a
    compare and a select more), for exponents with no lower bound but a real 0 to reach: the
    backward's logit minus lse, -inf on rows without keys."""
    c = [_hex(x) for x in POLYNOMIALS[degree]]
    r = _hex(ROUNDER)
    if scale == 1.0:
        frac = f" add.rn.f32 t, $1, {r}; sub.rn.f32 n, {r}, t; add.rn.f32 f, $1, n;"
    else:  # t holds round(scale·x); n = -round(scale·x); f = scale·x - round(scale·x)
        k = _hex(scale)
        frac = f" fma.rn.f32 t, $1, {k}, {r}; sub.rn.f32 n, {r}, t; fma.rn.f32 f, $1, {k}, n;"
    horner = f" fma.rn.f32 p, f, {c[-1]}, {c[-2]};" + "".join(f" fma.rn.f32 p, p, f, {x};" for x in c[-3::-1])
    exponent = " mov.b32 e, t; shl.b32 e, e, 23; mov.b32 pb, p; add.s32 pb, pb, e;"
    if not flush:
        return "{ .reg .f32 t, n, f, p; .reg .b32 e, pb;" + frac + horner + exponent + " mov.b32 $0, pb; }"
    if scale != 1.0:
        raise ValueError(f"poly_exp2_ptx: flush takes scale 1.0, got {scale}")
    low = f" setp.lt.f32 fl, $1, {_hex(FLUSH_BELOW)};"  # false for NaN: NaN stays NaN
    return ("{ .reg .f32 t, n, f, p; .reg .b32 e, pb; .reg .pred fl;" + low + frac + horner + exponent
            + " selp.b32 pb, 0, pb, fl; mov.b32 $0, pb; }")


def mufu_exp2_ptx(scale: float = 1.0) -> str:
    """PTX for $0 = 2^(scale·$1) on the special-function unit (what jnp.exp2 lowers to)."""
    if scale == 1.0:
        return "ex2.approx.ftz.f32 $0, $1;"
    return f"{{ .reg .f32 z; mul.rn.f32 z, $1, {_hex(scale)}; ex2.approx.ftz.f32 $0, z; }}"


def poly_exp2_reference(z: np.ndarray, scale: float = 1.0, degree: int = 3, flush: bool = False) -> np.ndarray:
    """What poly_exp2_ptx(scale, degree, flush) computes for $1 = z, step for step in float32 (the
    CPU tests hold its arithmetic to 2^(scale·z) through this; the GPU tests hold the kernels to
    the MUFU form and to xla)."""
    z = np.asarray(z, np.float32)
    rounder = np.float32(ROUNDER)

    def fused(add: np.ndarray) -> np.ndarray:  # scale·z + add with one rounding (fma), or z + add
        if scale == 1.0:
            return (z + add).astype(np.float32)
        return (z.astype(np.float64) * np.float64(np.float32(scale)) + add.astype(np.float64)).astype(np.float32)

    t = fused(np.full_like(z, rounder))
    f = fused((rounder - t).astype(np.float32))
    coefs = POLYNOMIALS[degree]
    p = np.full_like(f, coefs[-1])
    for coef in coefs[-2::-1]:  # fma: the float32 product is exact in float64, one rounding after
        p = (p.astype(np.float64) * f + np.float32(coef)).astype(np.float32)
    shift = (t.view(np.uint32).astype(np.uint64) << np.uint64(23)) & np.uint64(0xFFFFFFFF)
    bits = (p.view(np.uint32).astype(np.uint64) + shift) & np.uint64(0xFFFFFFFF)
    out = bits.astype(np.uint32).view(np.float32)
    return np.where(z < np.float32(FLUSH_BELOW), np.float32(0.0), out) if flush else out


def split_exp2(plgpu, x, every: int, scale: float = 1.0, degree: int = 3, flush: bool = False):
    """2^(scale·x) of a float32 tile in the WGMMA register layout (inside a Mosaic GPU kernel): of
    each thread's values, those whose index is a multiple of `every` by poly_exp2_ptx, the rest by
    the MUFU instruction jnp.exp2 lowers to."""
    poly, mufu = poly_exp2_ptx(scale, degree, flush), mufu_exp2_ptx(scale)
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm, vector
    from jax.experimental.mosaic.gpu import fragmented_array as fa  # imported when lowering only

    layout = plgpu.Layout.WGMMA

    @plgpu.inline_mgpu(arg_types=(layout,),
                       return_type=plgpu.ShapeDtypeStruct(x.shape, x.dtype, layout=layout))
    def body(_ctx, tile):
        f32 = ir.F32Type.get()

        def one(value, index):
            ptx = poly if index % every == 0 else mufu
            return llvm.inline_asm(f32, [value], ptx, "=f,f")

        flat = tile.registers.reshape(-1)
        out = np.empty_like(flat)
        for i, reg in enumerate(flat):
            (width,) = ir.VectorType(reg.type).shape
            res = llvm.mlir_undef(reg.type)
            for lane in range(width):
                pos = ir.DenseI64ArrayAttr.get([lane])
                lane_value = vector.extract(reg, dynamic_position=[], static_position=pos)
                res = vector.insert(one(lane_value, i * width + lane), res, dynamic_position=[],
                                    static_position=pos)
            out[i] = res
        return fa.FragmentedArray(_registers=out.reshape(tile.registers.shape), _layout=tile.layout,
                                  _is_signed=None)

    return body(x)
