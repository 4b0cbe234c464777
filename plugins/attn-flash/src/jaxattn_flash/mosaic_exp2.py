"""exp2 of a logit tile with part of it computed on the FMA pipe (FlashAttention-4's trick).

A soft-capped forward spends two special-function (MUFU) instructions per logit, tanh and exp2,
and a Hopper SM issues 16 of those a cycle against 128 float32 FMAs: the softmax of a 128-key
tile then takes about as long as the other warpgroup's two products, so the ping-pong no longer
hides it. `split_exp2` takes one value in every `every` of each thread's registers off the MUFU
unit: 2^z = 2^round(z) · 2^f with f in [-1/2, 1/2], 2^f by a cubic (relative error below 7.5e-5,
far under bfloat16's 3.9e-3 step of the P that P·V reads) and 2^round(z) added to its exponent
bits. The rounding is the 1.5·2^23 trick: z + 1.5·2^23 holds round(z) in its low mantissa bits, so
shifting the sum's bits left by 23 gives round(z) · 2^23, the exponent increment, with no
float-to-int conversion (which issues on a slow pipe).

Only for z within [-125, 125] (2^f's exponent plus round(z) must stay normal): the bounded
soft-capped logits (|z| <= cap·log2(e), `MosaicSpec.bounded_logits`) are. A NaN stays NaN; -inf
does not give 0, so the caller masks p, not z. One value in three (`config.MOSAIC_POLY_EXP2`) made
the capped forward 4–11% faster on an H200; splitting the tile by key columns instead, with a
second P·V product for them, was slower (flash BENCHMARKS.md).
"""

from __future__ import annotations

import numpy as np

POLY_EXP2 = (0.9999281, 0.69326097, 0.24261081, 0.05517143)  # 2^f on [-1/2, 1/2], minimax relative error
ROUNDER = 12582912.0  # 1.5·2^23: float32 addition of it rounds to an integer held in the low bits


def _hex(x: float) -> str:
    return f"0f{int(np.float32(x).view(np.uint32)):08X}"


_C0, _C1, _C2, _C3 = (_hex(c) for c in POLY_EXP2)
_R = _hex(ROUNDER)
POLY_EXP2_PTX = (  # $0 = 2^$1 on the FMA and integer pipes
    "{ .reg .f32 t, r, f, p; .reg .b32 e, pb;"
    f" add.rn.f32 t, $1, {_R}; sub.rn.f32 r, t, {_R}; sub.rn.f32 f, $1, r;"
    f" fma.rn.f32 p, f, {_C3}, {_C2}; fma.rn.f32 p, p, f, {_C1}; fma.rn.f32 p, p, f, {_C0};"
    " mov.b32 e, t; shl.b32 e, e, 23; mov.b32 pb, p; add.s32 pb, pb, e; mov.b32 $0, pb; }"
)
MUFU_EXP2_PTX = "ex2.approx.ftz.f32 $0, $1;"


def poly_exp2_reference(z: np.ndarray) -> np.ndarray:
    """What POLY_EXP2_PTX computes, step for step in float32 (the CPU tests hold its arithmetic
    to 2^z through this; the GPU test holds the kernel to the MUFU form)."""
    z = np.asarray(z, np.float32)
    rounder = np.float32(ROUNDER)
    t = z + rounder
    f = z - (t - rounder)
    p = np.full_like(f, POLY_EXP2[3])
    for coef in POLY_EXP2[2::-1]:  # fma: the float32 product is exact in float64, one rounding after
        p = (p.astype(np.float64) * f + np.float32(coef)).astype(np.float32)
    shift = (t.view(np.uint32).astype(np.uint64) << np.uint64(23)) & np.uint64(0xFFFFFFFF)
    bits = (p.view(np.uint32).astype(np.uint64) + shift) & np.uint64(0xFFFFFFFF)
    return bits.astype(np.uint32).view(np.float32)


def split_exp2(plgpu, z, every: int):
    """exp2 of a float32 tile in the WGMMA register layout (inside a Mosaic GPU kernel): of each
    thread's values, those whose index is a multiple of `every` by POLY_EXP2_PTX, the rest by the
    MUFU instruction jnp.exp2 lowers to."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm, vector
    from jax.experimental.mosaic.gpu import fragmented_array as fa  # imported when lowering only

    layout = plgpu.Layout.WGMMA

    @plgpu.inline_mgpu(arg_types=(layout,),
                       return_type=plgpu.ShapeDtypeStruct(z.shape, z.dtype, layout=layout))
    def body(_ctx, x):
        f32 = ir.F32Type.get()

        def one(value, index):
            ptx = POLY_EXP2_PTX if index % every == 0 else MUFU_EXP2_PTX
            return llvm.inline_asm(f32, [value], ptx, "=f,f")

        flat = x.registers.reshape(-1)
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
        return fa.FragmentedArray(_registers=out.reshape(x.registers.shape), _layout=x.layout, _is_signed=None)

    return body(z)
