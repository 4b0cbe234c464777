"""Pallas (Triton lowering) kernel for attention over a paged KV cache.

One kernel serves decode (one query per sequence) and ragged batches that mix prefill
chunks and decode tokens in one launch. The grid is `(work items, kv heads, kv splits)`:

* A work item is a block of up to `block_q` consecutive query tokens of one sequence
  (decode: exactly one token). Items are built on the device from `cu_q_lens`, so the
  grid is static (an upper bound, `ceil(tokens / block_q) + num_seqs`) and items past
  the real count do nothing.
* All `G = q_heads / kv_heads` query heads of one kv head are processed together: the
  program's query tile has `block_q * G` rows (padded to at least 16 for the tensor
  cores), so each K/V tile is read from memory once for all of them (GQA).
* Keys are visited in steps of `block_kv` tokens: several whole pages gathered through
  the page table per step (`block_kv >= page_size`), or a slice of one page
  (`block_kv < page_size`). Only the steps a query block can see are visited (causal
  end, sliding-window start).
* Split-KV (flash-decoding): the visible steps of an item are cut into `num_splits`
  ranges run by different programs; each writes its normalized partial output and
  log-sum-exp, and `merge_splits` combines them. Few long sequences still fill the GPU.

Semantics (docs/paged.md): `scale * q.k`, optional soft-cap `c * tanh(x / c)`, causal by
position (queries are the last positions of their sequence), sliding window
`pos - left <= key`, softmax in float32; sinks join the denominator in the epilogue.
Rows with no visible key give zeros and an lse of -inf. Non-finite inputs follow the
README's semantics: a non-finite logit a row sees propagates (NaN); a key holding a
non-finite value (a never-written slot, say) reaches no row that does not see it (the
partial steps zero such values before `p @ v`) and makes NaN the rows that do.

Quantized pages (int8, float8_e4m3fn; `k_scale`/`v_scale` per token and head): decode is
bound by reading the cache, so the kernel reads one byte per value and does the least
work per byte. Each loaded tile is converted to the query's dtype in registers (exact:
|int8| <= 127, and every e4m3 value is a bf16/fp16 value) and the dots run as for a
16-bit cache; the scales never touch a tile: a key's scale multiplies its column of the
logits (`[rows, block_kv]`, once per key for all query rows of the tile), a value's
scale multiplies its column of the probabilities before the second dot. A scalar scale
costs nothing in the loop: the key's folds into the query, the value's into the output.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from ._compat import masked_store, num_sms, pl, triton_params

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
NEG = -1e30  # finite "minus infinity" for running maxima (no inf - inf = NaN)
MIN_ROWS = 16  # tensor-core tiles need at least 16 rows


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclass(frozen=True)
class KernelConfig:
    """Static launch configuration.

    block_q: query tokens per program for prefill chunks of ragged batches (decode calls
      always use 1). Sequences with few queries (at most `16 / G`, e.g. decode tokens in
      a ragged batch) get small tiles of their own in the same launch (`two_tiles`).
    block_kv: key/value tokens per loop step (a power of two).
    num_splits: KV splits per work item; 0 chooses from the grid size and the GPU.
    num_warps, num_stages: Triton settings (warps per program, pipelining depth).
    target_programs: programs the automatic split aims at (0: 4 per SM; the Mosaic decode
      kernel: one per SM, which is also its count of persistent blocks).
    gather2d: gather whole pages as one `[block_kv, D]` tile (1) or as `[pages, page_size,
      D]` reshaped (0).
    mask_split: run the fully visible KV steps without the mask computation (1).
    two_tiles: ragged batches use small tiles for short sequences (1).
    int8_dots: int8 pages: how many of the two products run on int8 tensor cores instead of
      widening every key and value to the query's dtype (0). 1: Q·Kᵀ, the queries quantized
      to int8 per row in the kernel (keys are never widened; values are); 2: P·V too, the
      scaled probabilities quantized per row as well (as AQT's int8 matmuls quantize both
      operands). Each adds a rounding: on random data the output moves from 2.4e-3 of the
      dequantized cache's reference to 6.4e-3 (1) and 1.5e-2 (2).
    fp8_dots: float8_e4m3fn pages, decode on the Mosaic kernel (`mosaic` 1 or 2) only: K·Qᵀ on
      float8 tensor cores, the queries quantized to float8_e4m3fn per row (1), so keys are never
      widened; on random data the output moves from 3.7e-2 of the unquantized cache's reference
      to 4.5e-2.
    """

    block_q: int = 16
    block_kv: int = 128
    num_splits: int = 0
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int = 0
    gather2d: int = 1
    mask_split: int = 1
    two_tiles: int = 1
    int8_dots: int = 0
    fp8_dots: int = 0
    mosaic: int = 0  # 1: decode calls run mosaic_decode.py's Hopper kernel; 2: with two consumer warpgroups

    def replace(self, **changes: int) -> KernelConfig:
        return KernelConfig(**{**self.__dict__, **changes})


DECODE_CONFIG = KernelConfig(block_q=1, block_kv=128, num_warps=4, num_stages=3)
RAGGED_CONFIG = KernelConfig(block_q=32, block_kv=64, num_warps=4, num_stages=3)
MIN_STEPS_PER_SPLIT = 32  # automatic splits beyond 4 keep at least this many KV steps each


def _work_items(kv_lengths, cu_q_lens, tokens: int, block_q: int, block_kv: int,
                window_left: int | None, num_splits: int, num_items: int | None = None,
                take=None):
    """Per-item metadata `[W, 8]` int32: seq, q0, n, p0, kv_len, blk_lo, per_split, blk_hi.

    q0: first query token of the item; n: its real tokens (0 = nothing to do); p0: the
    sequence position of token q0; [blk_lo, blk_hi): the KV steps it can see;
    per_split: steps per split. `take(q_lens) -> bool [S]` limits a ragged batch to
    some sequences (the others get no items here).
    """
    kv_lengths = kv_lengths.astype(jnp.int32)
    num_seqs = kv_lengths.shape[0]
    if cu_q_lens is None:  # decode: item s is the one query of sequence s
        seq = jnp.arange(num_seqs, dtype=jnp.int32)
        q0 = seq
        n = (kv_lengths > 0).astype(jnp.int32)
        p0 = kv_lengths - 1
        kv_len = kv_lengths
    else:
        cu = cu_q_lens.astype(jnp.int32)
        q_lens = cu[1:] - cu[:-1]
        mine = q_lens if take is None else jnp.where(take(q_lens), q_lens, 0)
        nb = (mine + block_q - 1) // block_q
        ends = jnp.cumsum(nb)
        starts = ends - nb
        if num_items is None:
            num_items = -(-tokens // block_q) + num_seqs
        w = jnp.arange(num_items, dtype=jnp.int32)
        seq = jnp.clip(jnp.searchsorted(ends, w, side="right"), 0, num_seqs - 1).astype(jnp.int32)
        real = w < ends[-1]
        b = w - starts[seq]
        n = jnp.where(real, jnp.clip(mine[seq] - b * block_q, 0, block_q), 0)
        q0 = jnp.where(real, cu[seq] + b * block_q, 0)
        kv_len = kv_lengths[seq]
        p0 = kv_len - q_lens[seq] + b * block_q
    kv_hi = jnp.minimum(kv_len, p0 + n)  # causal: keys <= last query position
    kv_lo = jnp.zeros_like(kv_hi) if window_left is None else jnp.maximum(p0 - window_left, 0)
    blk_lo = kv_lo // block_kv
    blk_hi = jnp.where(n > 0, (kv_hi + block_kv - 1) // block_kv, blk_lo)
    blk_hi = jnp.maximum(blk_hi, blk_lo)
    per = (blk_hi - blk_lo + num_splits - 1) // num_splits
    return jnp.stack([seq, q0, n, p0, kv_len, blk_lo, per, blk_hi], axis=1).astype(jnp.int32)


def _kernel(meta_ref, pt_ref, q_ref, k_ref, v_ref, ks_ref, vs_ref, o_ref, lse_ref, *, classes, **static):
    """`classes`: static ((first item, end item, rows), ...): item ranges with their tile rows.

    `ks_ref`/`vs_ref`: per token scales `[num_pages, page_size]` of this kv head, or None."""
    w = pl.program_id(0)  # read here: the interpreter cannot read program ids inside a branch
    split = pl.program_id(2)
    refs = (meta_ref, pt_ref, q_ref, k_ref, v_ref, ks_ref, vs_ref, o_ref, lse_ref)
    if len(classes) == 1:
        _program(w, split, *refs, rows=classes[0][2], **static)
        return
    for start, end, rows in classes:
        @pl.when((w >= start) & (w < end))
        def _(rows=rows):
            _program(w, split, *refs, rows=rows, **static)


def _program(w, split, meta_ref, pt_ref, q_ref, k_ref, v_ref, ks_ref, vs_ref, o_ref, lse_ref, *, rows: int,
             group: int, page_size: int, block_kv: int, scale: float, soft_cap: float | None,
             window_left: int | None, precision, gather2d: bool, mask_split: bool, int8_dots: int):
    seq = meta_ref[w, 0]
    q0 = meta_ref[w, 1]
    n = meta_ref[w, 2]
    p0 = meta_ref[w, 3]
    kv_len = meta_ref[w, 4]
    blk_lo = meta_ref[w, 5]
    per = meta_ref[w, 6]
    blk_hi = meta_ref[w, 7]
    lo = blk_lo + split * per
    hi = jnp.minimum(blk_hi, lo + per)

    q = q_ref[pl.ds(q0 * group, rows), :]  # [rows, D]: tokens x G heads
    row_tok = lax.broadcasted_iota(jnp.int32, (rows,), 0) // group
    row_pos = p0 + row_tok  # sequence position of each row's query
    dv = v_ref.shape[-1]
    whole_pages = block_kv >= page_size
    pages_per_step = block_kv // page_size if whole_pages else 1
    qk_scale = scale if soft_cap is None else scale / soft_cap
    out_scale = LOG2E if soft_cap is None else soft_cap * LOG2E
    tok = lax.broadcasted_iota(jnp.int32, (block_kv,), 0)
    q_scale = None
    if int8_dots:  # the queries as int8 rows and a float32 scale per row
        q, q_scale = _int8_rows(q)

    def load(j, ref):
        """Step j's `[block_kv, ...]` tile of a `[num_pages, page_size, ...]` ref (None stays None)."""
        if ref is None:
            return None
        if whole_pages and gather2d:
            pages = pt_ref[seq, j * pages_per_step + tok // page_size]  # [block_kv] page of each key
            return ref[pages, tok % page_size]
        if whole_pages:
            tile = ref[pt_ref[seq, pl.ds(j * pages_per_step, pages_per_step)]]
            return tile.reshape(block_kv, *tile.shape[2:])
        start = j * block_kv
        return ref[pt_ref[seq, start // page_size], pl.ds(start % page_size, block_kv)]

    def step(masked):
        def body(j, carry):
            acc, m_i, l_i, poisoned = carry
            k = load(j, k_ref)
            v = load(j, v_ref)
            if int8_dots:  # int8 x int8 -> int32 on the tensor cores, then the query rows' scales
                s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
                s = s.astype(jnp.float32) * q_scale[:, None]
                if int8_dots == 1:
                    v = v.astype(q_ref.dtype)
            else:  # one-byte pages: converted in registers
                k, v = k.astype(q.dtype), v.astype(q.dtype)
                s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                    preferred_element_type=jnp.float32)  # [rows, block_kv]
            if ks_ref is None:
                s = s * qk_scale
            else:  # each key's scale multiplies its column of the logits
                s = s * (load(j, ks_ref).astype(jnp.float32) * qk_scale)[None, :]
            if soft_cap is not None:
                s = jnp.tanh(s)
            s = s * out_scale  # log2 domain
            if masked:
                k_pos = j * block_kv + tok
                visible = k_pos[None, :] <= row_pos[:, None]
                if window_left is not None:
                    visible = visible & (k_pos[None, :] >= row_pos[:, None] - window_left)
                s = jnp.where(visible, s, NEG)
            m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - m_new[:, None])
            if masked:
                p = jnp.where(visible, p, 0.0)
            if masked and not int8_dots:  # (int8 values are finite: nothing to clean)
                # Keys a row does not see (slots past the sequence's end, never written, above all)
                # may hold anything: non-finite values are zeroed, or 0 * NaN would reach the row;
                # a row that sees one is poisoned (NaN), as the semantics say.
                bad = jnp.max(jnp.where(jnp.isfinite(v), 0.0, 1.0), axis=1)
                v = jnp.where(bad[:, None] > 0.0, jnp.zeros_like(v), v)
                poisoned = jnp.maximum(poisoned, jnp.max(jnp.where(visible, bad[None, :], 0.0), axis=1))
            l_new = l_i * alpha + jnp.sum(p, axis=1)
            pw = p
            if vs_ref is not None:  # each value's scale multiplies its column of the probabilities
                v_s = load(j, vs_ref).astype(jnp.float32)
                if masked:  # never-written slots may hold NaN scales
                    v_s = jnp.where(k_pos < kv_len, v_s, 0.0)
                pw = p * v_s[None, :]
            if int8_dots == 2:
                pw, pw_scale = _int8_rows(pw)
                pv = lax.dot_general(pw, v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
                pv = pv.astype(jnp.float32) * pw_scale[:, None]
            else:
                pv = lax.dot_general(pw.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32)
            return acc * alpha[:, None] + pv, m_new, l_new, poisoned
        return body

    carry = (jnp.zeros((rows, dv), jnp.float32), jnp.full((rows,), NEG, jnp.float32),
             jnp.zeros((rows,), jnp.float32), jnp.zeros((rows,), jnp.float32))
    if mask_split:
        # Steps whose keys every real row sees: all keys <= p0 (the first row's position) and,
        # with a window, >= the last row's window start. Those skip the mask arithmetic.
        full_hi = (p0 + 1) // block_kv
        full_lo = 0 if window_left is None else (jnp.maximum(p0 + n - 1 - window_left, 0) + block_kv - 1) // block_kv
        a = jnp.clip(full_lo, lo, hi)
        b = jnp.clip(full_hi, a, hi)
        if window_left is not None:
            carry = lax.fori_loop(lo, a, step(True), carry)
        carry = lax.fori_loop(a, b, step(False), carry)
        carry = lax.fori_loop(b, hi, step(True), carry)
    else:
        carry = lax.fori_loop(lo, hi, step(True), carry)
    acc, m_i, l_i, poisoned = carry

    has_key = l_i != 0.0  # a NaN sum (a non-finite logit) counts: it propagates
    l_safe = jnp.where(has_key, l_i, 1.0)
    out = jnp.where(poisoned[:, None] > 0.0, jnp.nan, acc / l_safe[:, None])
    lse = jnp.where(has_key, (m_i + jnp.log2(l_safe)) * LN2, -jnp.inf)
    keep = row_tok < n
    masked_store(o_ref.at[pl.ds(q0 * group, rows), :], out.astype(o_ref.dtype), keep[:, None])
    masked_store(lse_ref.at[pl.ds(q0 * group, rows)], lse, keep)


def _int8_rows(x):
    """x `[rows, n]` as int8 (rounded to nearest, |x| / max |row| * 127) and the float32 scale
    of each row (1 for an all-zero row). A row holding a NaN or an infinity gets a NaN scale, so
    that the product's row is NaN as the widened path's would be (a GPU max skips NaN, and the
    int8 of NaN is 0: without this the value would vanish)."""
    x = x.astype(jnp.float32)
    # one reduction: a NaN or an infinity counts as +inf (a NaN compares false), so amax is
    # finite exactly where the row is
    amax = jnp.max(jnp.where(jnp.abs(x) < jnp.inf, jnp.abs(x), jnp.inf), axis=1)
    scale = jnp.where(amax < jnp.inf, jnp.where(amax > 0.0, amax / 127.0, 1.0), jnp.nan)
    y = x / scale[:, None]
    y = y + jnp.where(y >= 0.0, 0.5, -0.5)  # then truncation toward zero rounds to nearest
    return y.astype(jnp.int32).astype(jnp.int8), scale


def target_programs(cfg: KernelConfig, blocks_per_sm: int) -> int:
    """The CUDA blocks a launch aims at: `cfg.target_programs`, else `blocks_per_sm` per SM."""
    return cfg.target_programs or blocks_per_sm * num_sms()


def choose_splits(items: int, kv_heads: int, max_steps: int, cfg: KernelConfig, *, blocks_per_sm: int = 4,
                  round_down: bool = False) -> int:
    """KV splits of each (item, kv head): `cfg.num_splits` where set, else enough programs to reach
    `cfg.target_programs` (default `blocks_per_sm` per SM), rounded up, or down where a second,
    mostly empty wave would cost a whole one (`round_down`), each split at least
    `MIN_STEPS_PER_SPLIT` steps beyond the first 4, never more splits than steps."""
    if cfg.num_splits > 0:
        return max(1, min(cfg.num_splits, max_steps))
    target = target_programs(cfg, blocks_per_sm)
    programs = items * kv_heads
    if programs >= target:
        return 1
    wanted = target // programs if round_down else -(-target // programs)
    splits = min(wanted, max(4, max_steps // MIN_STEPS_PER_SPLIT))
    return max(1, min(splits, max_steps))


def paged_attention_kernel(query, key_pages, value_pages, kv_lengths, page_indices, cu_q_lens, *,
                           scale: float, window_left: int | None = None, soft_cap: float | None = None,
                           sinks=None, k_scale=None, v_scale=None, config: KernelConfig = RAGGED_CONFIG,
                           interpret: bool = False):
    """`out [tokens, Hq, Dv]` (query dtype) and `lse [Hq, tokens]` float32.

    Layout and semantics as `jaxattn.paged_attention` (docs/paged.md); `cu_q_lens=None` is
    decode (one query per sequence). `k_scale`/`v_scale`: None, a scalar, or per token and
    head `[num_pages, page_size, kv_heads]` (keys are `key_pages * k_scale[..., None]`).
    """
    tokens, hq, d = query.shape
    num_pages, page_size, hkv, _ = key_pages.shape
    dv = value_pages.shape[-1]
    num_seqs, pages_per_seq = page_indices.shape
    group = hq // hkv
    g2 = next_pow2(group)
    if cu_q_lens is None:
        block_q, small_q = 1, 0
    else:
        block_q = max(1, min(config.block_q, max(1, 128 // g2)))  # at most 128 rows per tile
        small_q = max(1, MIN_ROWS // g2)  # a 16-row tile: decode tokens, short sequences
        if not config.two_tiles or small_q >= block_q:
            small_q = 0
    gp = max(g2, -(-MIN_ROWS // block_q))
    rows = block_q * gp
    block_kv = config.block_kv
    num_stages = config.num_stages
    if max(d, dv) > 128:  # keep the pipelined K/V tiles inside shared memory
        block_kv = min(block_kv, 64)
        num_stages = min(num_stages, 2)
    if not (is_pow2(block_kv) and is_pow2(page_size)):
        raise ValueError(f"block_kv ({block_kv}) and page_size ({page_size}) must be powers of two")
    if block_kv < page_size and page_size % block_kv:
        raise ValueError("block_kv must divide page_size")
    if config.fp8_dots:
        raise ValueError(f"fp8_dots={config.fp8_dots} runs on the Mosaic decode kernel only (mosaic=1 or 2, "
                         "decode calls on a Hopper GPU)")
    if config.int8_dots:
        if key_pages.dtype != jnp.int8 or value_pages.dtype != jnp.int8:
            raise ValueError(f"int8_dots={config.int8_dots} takes int8 key and value pages, "
                             f"got {key_pages.dtype}/{value_pages.dtype}")
        if d % 32 or dv % 32 or block_kv < 32:
            raise ValueError(f"int8_dots={config.int8_dots} needs head dims multiples of 32 and block_kv >= 32 "
                             f"(int8 tensor-core tiles contract over 32), got head_dim {d}, value head_dim {dv}, "
                             f"block_kv {block_kv}")

    max_steps = -(-(pages_per_seq * page_size) // block_kv)
    if cu_q_lens is None:
        items = tokens
    elif small_q:
        big_items = -(-tokens // block_q) + min(num_seqs, tokens // (small_q + 1))
        small_items = min(num_seqs, tokens)
        items = big_items + small_items
    else:
        items = -(-tokens // block_q) + num_seqs
    splits = choose_splits(items, hkv, max_steps, config)
    if small_q:
        big = _work_items(kv_lengths, cu_q_lens, tokens, block_q, block_kv, window_left, splits, big_items,
                          take=lambda ql: ql > small_q)
        small = _work_items(kv_lengths, cu_q_lens, tokens, small_q, block_kv, window_left, splits, small_items,
                            take=lambda ql: ql <= small_q)
        meta = jnp.concatenate([big, small])
        classes = ((0, big_items, rows), (big_items, items, small_q * gp))
    else:
        meta = _work_items(kv_lengths, cu_q_lens, tokens, block_q, block_kv, window_left, splits)
        classes = ((0, items, rows),)

    # Page table padded so that the last step's gather stays in bounds.
    table = page_indices.astype(jnp.int32)
    if block_kv > page_size:
        pps = block_kv // page_size
        table = jnp.pad(table, ((0, 0), (0, max_steps * pps - pages_per_seq)))

    # The dots run in the cache's dtype, or the query's for one-byte pages (converted per tile).
    compute_dtype = query.dtype if key_pages.dtype.itemsize == 1 else key_pages.dtype
    k_scale, v_scale = (None if x is None else jnp.asarray(x) for x in (k_scale, v_scale))
    if k_scale is not None and k_scale.ndim == 0:  # one scale for every key: fold it into the queries
        query = (query.astype(jnp.float32) * k_scale.astype(jnp.float32)).astype(query.dtype)
    # Queries as [Hkv, (tokens + block_q) * Gp, D]: the rows of one item are contiguous.
    q = query.astype(compute_dtype).reshape(tokens, hkv, group, d)
    q = jnp.pad(q, ((0, block_q), (0, 0), (0, gp - group), (0, 0)))
    q = q.transpose(1, 0, 2, 3).reshape(hkv, (tokens + block_q) * gp, d)
    total_rows = (tokens + block_q) * gp

    out_dtype = query.dtype if splits == 1 else jnp.float32
    precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None
    per_token = [x if x is not None and x.ndim else None for x in (k_scale, v_scale)]
    scale_specs = [None if x is None else pl.BlockSpec((num_pages, page_size, None), lambda i, h, s: (0, 0, h))
                   for x in per_token]
    kernel = functools.partial(
        _kernel, classes=classes, group=gp, page_size=page_size, block_kv=block_kv, scale=float(scale),
        soft_cap=soft_cap, window_left=window_left, precision=precision, gather2d=bool(config.gather2d),
        mask_split=bool(config.mask_split), int8_dots=int(config.int8_dots))
    grid = (meta.shape[0], hkv, splits)
    full = lambda shape: pl.BlockSpec(shape, lambda i, h, s: (0,) * len(shape))  # noqa: E731
    o, lse = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            full(meta.shape),
            full(table.shape),
            pl.BlockSpec((None, total_rows, d), lambda i, h, s: (h, 0, 0)),
            pl.BlockSpec((num_pages, page_size, None, d), lambda i, h, s: (0, 0, h, 0)),
            pl.BlockSpec((num_pages, page_size, None, dv), lambda i, h, s: (0, 0, h, 0)),
            *scale_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, total_rows, dv), lambda i, h, s: (s, h, 0, 0)),
            pl.BlockSpec((None, None, total_rows), lambda i, h, s: (s, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, hkv, total_rows, dv), out_dtype),
            jax.ShapeDtypeStruct((splits, hkv, total_rows), jnp.float32),
        ],
        compiler_params=None if interpret else triton_params(config.num_warps, num_stages),
        interpret=interpret,
        name=f"jaxattn_paged_bq{block_q}_bk{block_kv}_s{splits}",
    )(meta, table, q, key_pages, value_pages, *per_token)

    o = o.reshape(splits, hkv, tokens + block_q, gp, dv)[:, :, :tokens, :group]
    lse = lse.reshape(splits, hkv, tokens + block_q, gp)[:, :, :tokens, :group]
    out, lse = merge_splits(o, lse)  # [Hkv, T, G, Dv], [Hkv, T, G]
    if v_scale is not None and v_scale.ndim == 0:  # one scale for every value: it scales the output
        out = out * v_scale.astype(jnp.float32)
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(hkv, 1, group)
        has_key = lse != -jnp.inf
        total = jnp.logaddexp(jnp.where(has_key, lse, 0.0), sink)
        out = out * jnp.where(has_key, jnp.exp(lse - total), 0.0)[..., None]
        lse = jnp.where(has_key, total, -jnp.inf)
    valid = _valid_tokens(kv_lengths, cu_q_lens, tokens)
    out = jnp.where(valid[None, :, None, None], out, 0.0)
    lse = jnp.where(valid[None, :, None], lse, -jnp.inf)
    out = out.transpose(1, 0, 2, 3).reshape(tokens, hq, dv).astype(query.dtype)
    lse = lse.transpose(0, 2, 1).reshape(hq, tokens)
    return out, lse


def merge_splits(o, lse):
    """Combine split-KV partials: `o [S, ...rows, Dv]` normalized, `lse [S, ...rows]`.
    Splits without keys (lse -inf) weigh 0; a NaN lse or output propagates."""
    if o.shape[0] == 1:
        return o[0].astype(jnp.float32), lse[0]
    m = jnp.max(lse, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(lse == -jnp.inf, 0.0, jnp.exp(lse - m_safe[None]))
    o = jnp.where((lse == -jnp.inf)[..., None], 0.0, o.astype(jnp.float32))
    total = jnp.sum(w, axis=0)
    has_key = total != 0
    out = jnp.sum(w[..., None] * o, axis=0) / jnp.where(has_key, total, 1.0)[..., None]
    out_lse = jnp.where(has_key, m_safe + jnp.log(jnp.where(has_key, total, 1.0)), -jnp.inf)
    return out, out_lse


def _valid_tokens(kv_lengths, cu_q_lens, tokens: int):
    """Query tokens that belong to a sequence (decode: sequences with a key)."""
    kv_lengths = kv_lengths.astype(jnp.int32)
    if cu_q_lens is None:
        return kv_lengths > 0
    cu = cu_q_lens.astype(jnp.int32)
    return jnp.arange(tokens, dtype=jnp.int32) < cu[-1]
