"""Named hardware barriers between the warpgroups of one Mosaic GPU block (inline PTX).

Pallas's Mosaic GPU lowering gives mbarriers (for copies) and whole-block syncs; what the forward
and the wide backward also need are the PTX named barriers (`bar.sync` / `bar.arrive` with an id
and a thread count, ids 0-4 are Mosaic's own): the consumers' ping-pong (ids 8 and 9), a meeting
of the two consumer warpgroups (10), and `bar.red.or` (11), an "any" over every thread of the
block that returns the same answer to all of them without a trip through shared memory.
"""

from __future__ import annotations

import jax.numpy as jnp

CONSUMERS = 2  # consumer warpgroups per block (a producer warpgroup beside them)
SCHEDULE_BARRIER = 8  # named barriers 8 (warpgroup 0) and 9 (warpgroup 1)
CONSUMERS_BARRIER = 10  # both consumers (a guarded tile is clean)
ANY_BARRIER = 11  # every warpgroup of the block: `block_any`


def _bar(plgpu, op: str, barrier_id) -> None:
    """`bar.<op>` of both consumer warpgroups (256 threads) on the named barrier
    `barrier_id(wg)` (`wg`: this warpgroup's index, an MLIR i32 value)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    @plgpu.inline_mgpu()
    def emit(_ctx):
        bid = barrier_id(mgpu_utils.warpgroup_idx(sync=False))
        llvm.inline_asm(ir.Type.parse("!llvm.void"), [bid], f"bar.{op} $0, {CONSUMERS * 128};", "r",
                        has_side_effects=True)

    emit()


def _i32_const(value: int):
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith

    return arith.constant(ir.IntegerType.get_signless(32), value)


def named_barrier(plgpu, op: str, own: bool) -> None:
    """`bar.<op>` on a consumer's own schedule barrier (8 + wg) or the other's (9 - wg)."""
    from jax._src.lib.mlir.dialects import arith

    if own:
        _bar(plgpu, op, lambda wg: arith.addi(wg, _i32_const(SCHEDULE_BARRIER)))
    else:
        _bar(plgpu, op, lambda wg: arith.subi(_i32_const(SCHEDULE_BARRIER + 1), wg))


def consumers_sync(plgpu) -> None:
    """`bar.sync` of both consumer warpgroups on their own named barrier."""
    _bar(plgpu, "sync", lambda _wg: _i32_const(CONSUMERS_BARRIER))


def _vector_length(ir, type_) -> int:
    """Elements of an MLIR vector type; 0 for a scalar type."""
    try:
        return ir.VectorType(type_).shape[0]
    except ValueError:
        return 0


def block_any(plgpu, flags=None, layout=None, *, warpgroups: int = CONSUMERS + 1):
    """Whether any entry of `flags` (a float array, nonzero = yes, in `layout`) is set in any of the
    block's `warpgroups` warpgroups, each of which must call this once at the same point (a
    warpgroup with nothing to say passes no `flags`). One `bar.red.or.pred` on barrier 11: every
    thread ORs its own registers, the barrier ORs the threads and hands the answer back to all.
    Returns an int32 scalar, 1 or 0, the same in every thread."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, vector
    from jax.experimental.mosaic import gpu as mgpu

    splat = plgpu.ShapeDtypeStruct((), jnp.int32, layout=plgpu.Layout.WG_SPLAT(shape=()))
    ptx = ("{ .reg .pred p, q; setp.ne.b32 q, $1, 0; "
           f"bar.red.or.pred p, {ANY_BARRIER}, {warpgroups * 128}, q; selp.b32 $0, 1, 0, p; }}")

    def reduce_threads(mine):
        answer = llvm.inline_asm(ir.IntegerType.get_signless(32), [mine], ptx, "=r,r", has_side_effects=True)
        return mgpu.FragmentedArray.splat(answer, (), layout=mgpu.WGSplatFragLayout(()), is_signed=True)

    if flags is None:
        return plgpu.inline_mgpu(return_type=splat)(lambda _ctx: reduce_threads(_i32_const(0)))()

    @plgpu.inline_mgpu(arg_types=(layout,), return_type=splat)
    def emit(_ctx, fa):
        i32 = ir.IntegerType.get_signless(32)
        mine = _i32_const(0)
        for reg in fa.registers.flat:
            length = _vector_length(ir, reg.type)
            parts = [vector.extract(reg, [], [i]) for i in range(length)] if length else [reg]
            for x in parts:
                set_ = arith.cmpf(arith.CmpFPredicate.UNE, x, arith.constant(x.type, 0.0))
                mine = arith.ori(mine, arith.extui(i32, set_))
        return reduce_threads(mine)

    return emit(flags)
