"""What the Mosaic decode kernel (`mosaic_decode.py`) serves: its shared-memory budget, the
reasons it refuses a call (said before it is traced, by the plugin, `jaxattn tune` and the
kernel itself), and the rule that makes it the default for one-byte decode on Hopper."""

from __future__ import annotations

import jax.numpy as jnp

from jaxattn.pallas_compat import SMEM_PER_BLOCK, smem_footprint

MAX_GROUP = 256  # wgmma's largest N: query heads per kv head
ONE_BYTE = (jnp.int8, jnp.float8_e4m3fn)  # page dtypes with per-token scales, widened in shared memory


def padded_group(group: int) -> int:
    """The query heads of a kv head as wgmma columns: a multiple of 8."""
    return max(8, -(-group // 8) * 8)


def query_scale_row(group: int) -> int:
    """Floats in a shared-memory row of one unit's query scales: the padded group rounded up to
    32 (128 bytes), since each row is a TMA copy's destination, which must be 128-byte aligned."""
    return -(-padded_group(group) // 32) * 32


def smem_bytes(d: int, dv: int, group: int, block_kv: int, stages: int, page_itemsize: int,
               widen_keys: bool, widen_values: bool, q_itemsize: int = 2, widened_slots: int = 1,
               consumers: int = 1) -> int:
    """Shared memory of one CUDA block, as Pallas's Mosaic GPU lowering lays it out
    (`pallas_compat.smem_footprint`: the buffers, the softmax's reductions, the barriers);
    `test_smem_bytes_are_what_the_lowering_allocates` holds it to the lowering's own count.
    `widened_slots`: 16-bit slots of the widened tiles (`stages`
    with the widener warpgroup, else one per consumer); each consumer warpgroup has its own
    probabilities and output tiles; two units' queries."""
    gn = padded_group(group)
    sizes = [2 * gn * d * q_itemsize, 2 * query_scale_row(group) * 4, stages * block_kv * d * page_itemsize,
             stages * block_kv * dv * page_itemsize, consumers * gn * block_kv * 2, consumers * dv * gn * 4,
             consumers * gn * 4]
    barriers = 2 + 2 + 2 * stages  # the query slots' (loaded, free), the ring's (loaded, free)
    if widened_slots > 1 and consumers == 1:
        barriers += stages  # the widener warpgroup's: a slot's 16-bit tiles are ready
    widened_slots = max(widened_slots, consumers)
    if widen_keys:
        sizes.append(widened_slots * block_kv * d * 2)
    if widen_values:
        sizes += [widened_slots * block_kv * dv * 2, stages * block_kv * 4, stages * block_kv * 4]
    if consumers > 1:
        barriers += 2  # the consumers' turns
    return smem_footprint(sizes, barriers, reductions=True)


# Decode over one-byte pages runs on the Mosaic decode kernel by default on a Hopper GPU
# wherever it serves the call and no config is given (the Triton kernel otherwise): on an H200,
# with persistent blocks, four producer warps, two consumers and K·Qᵀ in the pages' dtype, int8
# pages decode at 1.28-1.58x the tokens/s of bf16 pages and fp8 pages at 1.27-1.55x (BENCHMARKS.md,
# "Persistent blocks"), where the Triton kernel gives 1.11-1.21x and 0.93-0.97x.
# Both quantize the queries per head: on random data the output moves from the unquantized
# cache's by 1.2e-2 for int8 (the Triton kernel's default: 9.6e-3) and 4.5e-2 for fp8 (3.7e-2
# with 16-bit products).
ONE_BYTE_DECODE = {"int8": dict(mosaic=2, int8_dots=1, num_stages=4, block_kv=128),
                   "float8_e4m3fn": dict(mosaic=2, fp8_dots=1, num_stages=4, block_kv=128)}


def one_byte_decode_config(query, key_pages, value_pages, *, window_left=None, soft_cap=None,
                           sinks=None) -> dict | None:
    """The `ONE_BYTE_DECODE` settings of a decode call's page dtype where this kernel serves the
    call with them, else None (the caller checks that the GPU is a Hopper one)."""
    changes = ONE_BYTE_DECODE.get(jnp.dtype(key_pages.dtype).name)
    if changes is None or mosaic_reasons(query, key_pages, value_pages, window_left=window_left, soft_cap=soft_cap,
                                         sinks=sinks, block_kv=changes["block_kv"], stages=changes["num_stages"],
                                         int8_dots=changes.get("int8_dots", 0), fp8_dots=changes.get("fp8_dots", 0),
                                         consumers=changes["mosaic"]):
        return None
    return changes


def widener_fits(d: int, group: int, block_kv: int, stages: int, quantized_qk: bool) -> bool:
    """Whether one-byte pages' ring and the widener's 16-bit ring of as many slots fit in shared
    memory (keys widened too without `quantized_qk`)."""
    need = smem_bytes(d, d, group, block_kv, stages, 1, not quantized_qk, True, 1 if quantized_qk else 2,
                      widened_slots=stages)
    return need <= SMEM_PER_BLOCK


def mosaic_reasons(query, key_pages, value_pages, *, cu_q_lens=None, window_left=None, soft_cap=None,
                   sinks=None, block_kv: int = 128, stages: int = 2, int8_dots: int = 0,
                   fp8_dots: int = 0, consumers: int = 1) -> list[str]:
    """Why `mosaic_decode` cannot serve a call (empty: it can)."""
    _, hq, d = query.shape
    _, ps, hkv, dv = value_pages.shape
    return layout_reasons(q_dtype=query.dtype, kv_dtype=key_pages.dtype, num_q_heads=hq, num_kv_heads=hkv,
                          head_dim=d, value_head_dim=dv, page_size=ps, ragged=cu_q_lens is not None,
                          masked_or_capped=window_left is not None or soft_cap is not None or sinks is not None,
                          block_kv=block_kv, stages=stages, int8_dots=int8_dots, fp8_dots=fp8_dots,
                          consumers=consumers)


def request_reasons(request, block_kv: int = 128, stages: int = 2) -> list[str]:
    """`mosaic_reasons` for a paged `AttentionRequest` (what `tuning_space` asks before it offers
    the kernel to `jaxattn tune`)."""
    paged = request.paged
    if paged is None:
        return ["the Mosaic decode kernel serves paged calls only"]
    extra = request.logits_soft_cap or request.has_sinks or "sliding_window" in request.mask_kinds
    return layout_reasons(q_dtype=request.dtype, kv_dtype=request.kv_dtype, num_q_heads=request.num_q_heads,
                          num_kv_heads=request.num_kv_heads, head_dim=request.head_dim,
                          value_head_dim=request.value_head_dim, page_size=paged.page_size, ragged=paged.ragged,
                          masked_or_capped=extra, block_kv=block_kv, stages=stages, int8_dots=0)


def layout_reasons(*, q_dtype, kv_dtype, num_q_heads: int, num_kv_heads: int, head_dim: int, value_head_dim: int,
                   page_size: int, ragged: bool, masked_or_capped: bool, block_kv: int, stages: int,
                   int8_dots: int, fp8_dots: int = 0, consumers: int = 1) -> list[str]:
    """The reasons of `mosaic_reasons` and `request_reasons`, from the call's dtypes and sizes."""
    reasons = []
    q_dtype, kv_dtype = jnp.dtype(q_dtype), jnp.dtype(kv_dtype)
    d, dv, ps, hq, hkv = head_dim, value_head_dim, page_size, num_q_heads, num_kv_heads
    if ragged:
        reasons.append("the Mosaic decode kernel serves decode calls only (no cu_q_lens)")
    if masked_or_capped:
        reasons.append("the Mosaic decode kernel has no sliding window, soft-cap or sinks yet")
    if q_dtype not in (jnp.bfloat16, jnp.float16):
        reasons.append(f"the Mosaic decode kernel takes bf16/fp16 queries, not {q_dtype}")
    if kv_dtype not in (q_dtype, *ONE_BYTE):
        reasons.append(f"the Mosaic decode kernel takes pages of the query's dtype, int8 or float8_e4m3fn, "
                       f"not {kv_dtype}")
    if int8_dots and kv_dtype != jnp.int8:
        reasons.append("the Mosaic decode kernel's int8_dots needs int8 pages")
    if fp8_dots and kv_dtype != jnp.float8_e4m3fn:
        reasons.append("the Mosaic decode kernel's fp8_dots needs float8_e4m3fn pages")
    if d != dv or d not in (64, 128):
        reasons.append(f"the Mosaic decode kernel takes head_dim 64 or 128 for keys and values, got {d}/{dv}")
    if ps % 8 or block_kv % ps:
        reasons.append(f"the Mosaic decode kernel needs page_size a multiple of 8 dividing block_kv {block_kv}, "
                       f"got {ps}")
    if block_kv % 64:
        reasons.append(f"the Mosaic decode kernel needs block_kv a multiple of 64 (wgmma's rows), got {block_kv}")
    if int8_dots > 1:
        reasons.append("the Mosaic decode kernel runs P·V on 16-bit tensor cores only (int8_dots 0 or 1)")
    quant = kv_dtype in ONE_BYTE
    if consumers not in (1, 2):
        reasons.append(f"the Mosaic decode kernel takes consumers 1 or 2, got {consumers}")
    elif stages % consumers:  # a warpgroup tracks a barrier's phase by its own waits: it must see every one
        reasons.append(f"the Mosaic decode kernel with {consumers} consumer warpgroups needs stages (num_stages) "
                       f"a multiple of {consumers}, each owning its slots; got {stages}")
    one_byte_qk = quant and (int8_dots or fp8_dots)
    need = smem_bytes(d, dv, hq // hkv, block_kv, stages, kv_dtype.itemsize, quant and not one_byte_qk, quant,
                      1 if one_byte_qk else 2, consumers=consumers)
    if need > SMEM_PER_BLOCK:
        reasons.append(f"the Mosaic decode kernel's tiles at block_kv {block_kv} and {stages} stages need {need} "
                       f"bytes of shared memory, more than {SMEM_PER_BLOCK}")
    if hq // hkv > MAX_GROUP:
        reasons.append(f"the Mosaic decode kernel takes at most {MAX_GROUP} query heads per kv head")
    return reasons
