"""Keeping non-finite values of masked keys away from the rows that do not see them, around
kernels that cannot do it themselves (cuDNN, jax's splash kernel).

Such a kernel computes `p @ v` with `p = 0` on the keys a row does not see, and `0 * NaN`
is NaN: a NaN (or inf) in the value of a masked key would reach every row of its tile.
The README's semantics ("masked means the mask") say it must reach exactly the rows that
see that key. Around the kernel:

1. `bad_keys(value)`: the keys holding a non-finite value, `[B, S, Hkv]`;
2. `clean(value, bad)`: those values zeroed, given to the kernel (forward and backward);
3. `seen_rows(bad, inputs)`: the rows that see one of them. When the mask is a band,
   chunks and sequence lengths (`band_rows`), from prefix counts: O(sequence) work. Any
   other mask (segment ids, dense, `|`) is evaluated one key block at a time
   (`mask_rows`, O(q_len x kv_len) elementwise), only when some value is non-finite;
4. `poison(out, rows)`: those rows made NaN.

`guarded(run, inputs)` does all four around `run`, only where a mask or sequence lengths can
hide a key (`hides_keys`), and in a call that is not differentiated and moves at least
`BRANCHLESS_BYTES` only when some value is non-finite. The rows made NaN get no gradient
through `poison` (their loss is NaN already); the kernel's backward sees finite values.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from .inputs import AttentionInputs
from .masks import Mask, mask_parts

Output = tuple[jax.Array, jax.Array | None]

# A call not differentiated whose values and output take fewer bytes than this runs the guard
# always (a cleaned copy of the values and a pass over the output: a few microseconds at these
# sizes, and the same output where every value is finite) instead of the `lax.cond` that skips
# it: on a GPU the cond reads its predicate back to the host before it goes on, which cost ~18 µs
# per call on an H200 (32 chained (1, 512, 32/8, 128) causal calls: 39-41 µs per call through
# the cudnn backend, 21 µs through jax.nn's cuDNN call).
BRANCHLESS_BYTES = 16 << 20


def bad_keys(value: jax.Array) -> jax.Array:
    """Bool `[B, S, Hkv]`: the keys whose value `[B, S, Hkv, D]` holds a NaN or inf."""
    return ~jnp.all(jnp.isfinite(value), axis=-1)


def clean(value: jax.Array, bad: jax.Array) -> jax.Array:
    """`value` with the keys of `bad` zeroed."""
    return jnp.where(bad[..., None], jnp.zeros((), value.dtype), value)


def _per_query_head(rows: jax.Array, num_q_heads: int) -> jax.Array:
    """`[B, Sq, Hkv]` -> `[B, Sq, Hq]`: query head `h` reads key/value head `h // group`."""
    return jnp.repeat(rows, num_q_heads // rows.shape[2], axis=2)


def band_rows(bad: jax.Array, *, q_len: int, num_q_heads: int, band_lo: int | None = None,
              band_hi: int | None = None, chunk: tuple[int, int] | None = None,
              q_lengths: jax.Array | None = None, kv_lengths: jax.Array | None = None) -> jax.Array:
    """Bool `[B, Sq, Hq]`: the rows `i < q_lengths[b]` that see a key `j` of `bad` under the
    band `band_lo <= j - i <= band_hi`, the chunk rule `(chunk_size, offset)` of
    `ChunkedCausalMask` and `j < kv_lengths[b]` (each optional)."""
    b, kv_len, _ = bad.shape
    counts = jnp.cumsum(bad.astype(jnp.int32), axis=1)
    counts = jnp.pad(counts, ((0, 0), (1, 0), (0, 0)))  # counts[:, j] = bad keys before j
    i = jnp.arange(q_len, dtype=jnp.int32)
    first = jnp.zeros_like(i) if band_lo is None else i + band_lo
    stop = jnp.full_like(i, kv_len) if band_hi is None else i + band_hi + 1
    if chunk is not None:
        size, offset = chunk
        start = jnp.floor_divide(i + offset, size) * size
        first, stop = jnp.maximum(first, start), jnp.minimum(stop, i + offset + 1)
    first = jnp.broadcast_to(jnp.clip(first, 0, kv_len), (b, q_len))
    stop = jnp.broadcast_to(jnp.clip(stop, 0, kv_len), (b, q_len))
    if kv_lengths is not None:
        stop = jnp.minimum(stop, jnp.clip(kv_lengths.astype(jnp.int32), 0, kv_len)[:, None])
    stop = jnp.maximum(stop, first)
    seen = (jnp.take_along_axis(counts, stop[..., None], axis=1)
            - jnp.take_along_axis(counts, first[..., None], axis=1)) > 0
    if q_lengths is not None:
        seen = seen & (i[None, :] < q_lengths[:, None])[..., None]
    return _per_query_head(seen, num_q_heads)


def mask_rows(bad: jax.Array, mask: Mask | None, *, q_len: int, num_q_heads: int,
              q_lengths: jax.Array | None = None, kv_lengths: jax.Array | None = None,
              block_kv: int = 512) -> jax.Array:
    """Bool `[B, Sq, Hq]`: the rows that see a key of `bad` under `mask` and the sequence
    lengths, evaluated one block of keys at a time."""
    b, kv_len, hkv = bad.shape
    block_kv = max(1, min(block_kv, kv_len))
    blocks = -(-kv_len // block_kv)
    bad = jnp.pad(bad, ((0, 0), (0, blocks * block_kv - kv_len), (0, 0)))
    q_pos = jnp.arange(q_len)
    group = num_q_heads // hkv

    def step(seen, j):
        k_pos = j * block_kv + jnp.arange(block_kv)
        ok = jnp.ones((1, 1, q_len, block_kv), bool)
        if mask is not None:
            ok = ok & mask.allowed(q_pos, jnp.minimum(k_pos, kv_len - 1), q_len, kv_len)
        if kv_lengths is not None:
            ok = ok & (k_pos[None, :] < kv_lengths[:, None])[:, None, None, :]
        bad_j = lax.dynamic_slice_in_dim(bad, j * block_kv, block_kv, axis=1)  # [B, bk, Hkv]
        bad_j = jnp.repeat(jnp.swapaxes(bad_j, 1, 2), group, axis=1)[:, :, None, :]  # [B, Hq, 1, bk]
        return seen | jnp.any(ok & bad_j, axis=-1), None  # [B, Hq, Sq]

    seen, _ = lax.scan(step, jnp.zeros((b, num_q_heads, q_len), bool), jnp.arange(blocks))
    if q_lengths is not None:
        seen = seen & (q_pos[None, :] < q_lengths[:, None])[:, None, :]
    return jnp.swapaxes(seen, 1, 2)


def poison(out: jax.Array, rows: jax.Array) -> jax.Array:
    """`out [B, Sq, Hq, Dv]` with the rows of `rows` (`[B, Sq, Hq]`) set to NaN."""
    return jnp.where(rows[..., None], jnp.asarray(jnp.nan, out.dtype), out)


def seen_rows(bad: jax.Array, inputs: AttentionInputs) -> jax.Array:
    """Bool `[B, Sq, Hq]`: the rows of `inputs` whose mask lets them see a key of `bad`."""
    q_len, num_q_heads = inputs.query.shape[1], inputs.query.shape[2]
    lengths = dict(q_lengths=inputs.q_seq_lengths, kv_lengths=inputs.kv_seq_lengths)
    try:
        parts = mask_parts(inputs.mask, q_len, inputs.key.shape[1])
    except ValueError:  # `|`, or what a band cannot say
        parts = None
    if parts is not None and parts.dense is None and parts.q_segment_ids is None:
        chunk = None if parts.chunk_size is None else (parts.chunk_size, parts.chunk_offset)
        return band_rows(bad, q_len=q_len, num_q_heads=num_q_heads, band_lo=parts.band_lo,
                         band_hi=parts.band_hi, chunk=chunk, **lengths)

    def evaluate() -> jax.Array:
        return mask_rows(bad, inputs.mask, q_len=q_len, num_q_heads=num_q_heads, **lengths)

    zeros = jnp.zeros((bad.shape[0], q_len, num_q_heads), bool)
    return lax.cond(jnp.any(bad), evaluate, lambda: zeros)


def hides_keys(inputs: AttentionInputs) -> bool:
    """Whether a row of `inputs` may not see some key (a mask or sequence lengths). Without one,
    every row sees every key: a non-finite value reaches every row in the kernel as it must,
    and there is nothing to guard."""
    return inputs.mask is not None or inputs.q_seq_lengths is not None or inputs.kv_seq_lengths is not None


def moved_bytes(inputs: AttentionInputs) -> int:
    """Bytes of the values and of the output (`[B, Sq, Hq, Dv]` in the values' dtype): what the
    always-run guard copies and passes over."""
    value = inputs.value
    out = inputs.query.size // inputs.query.shape[-1] * value.shape[-1]
    return (value.size + out) * value.dtype.itemsize


def guarded(run: Callable[[AttentionInputs], Output], inputs: AttentionInputs, *,
            branchless_bytes: int | None = None) -> Output:
    """`run(inputs)` with the values of masked keys kept from the rows that do not see them.

    Not differentiated, the kernel gets the values as they are unless one is non-finite (a
    `lax.cond`: the common case costs one read of `value`, not a cleaned copy and a pass over
    the output; under `vmap` with a batched predicate both branches run), except in calls
    smaller than `branchless_bytes` (default `BRANCHLESS_BYTES`: a GPU's cond waits for the
    host; a TPU's does not, and 0 keeps the cond at every size), which run the guard always.
    Differentiated, it always runs on the cleaned values, so its backward sees finite ones."""
    if not hides_keys(inputs):
        return run(inputs)
    return _guarded(run, inputs, BRANCHLESS_BYTES if branchless_bytes is None else branchless_bytes)


def _always_guarded(run: Callable[[AttentionInputs], Output], inputs: AttentionInputs,
                    bad: jax.Array | None = None) -> Output:
    """The guard itself; `bad` is `bad_keys(inputs.value)` where the caller has it already."""
    bad = bad_keys(inputs.value) if bad is None else bad
    out, lse = run(inputs.replace(value=clean(inputs.value, bad)))
    return poison(out, seen_rows(bad, inputs)), lse


def _guarded(run: Callable[[AttentionInputs], Output], inputs: AttentionInputs, branchless_bytes: int) -> Output:
    # A custom_vjp over the floating-point leaves only (integer lengths, segment ids and masks
    # have no cotangent to rebuild an `AttentionInputs` from): its primal is the cheap form.
    leaves, treedef = jax.tree_util.tree_flatten(inputs)
    floating = [i for i, x in enumerate(leaves) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]

    def rebuild(floats: tuple[jax.Array, ...]) -> AttentionInputs:
        merged = list(leaves)
        for i, x in zip(floating, floats):
            merged[i] = x
        return jax.tree_util.tree_unflatten(treedef, merged)

    @jax.custom_vjp
    def guard(floats):
        x = rebuild(floats)
        bad = bad_keys(x.value)  # the predicate's pass over the values serves the guard too
        if moved_bytes(x) < branchless_bytes:
            return _always_guarded(run, x, bad)
        return lax.cond(jnp.any(bad), lambda: _always_guarded(run, x, bad), lambda: run(x))

    def guard_fwd(floats):
        return jax.vjp(lambda f: _always_guarded(run, rebuild(f)), floats)

    def guard_bwd(vjp, cotangents):
        return vjp(cotangents)

    guard.defvjp(guard_fwd, guard_bwd)
    return guard(tuple(leaves[i] for i in floating))
