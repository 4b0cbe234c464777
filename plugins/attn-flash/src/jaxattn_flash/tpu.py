"""The TPU path: jax's Pallas TPU flash-attention kernel, wrapped.

`jax.experimental.pallas.ops.tpu.flash_attention` covers full and causal attention
(q_len == kv_len), segment ids, forward and backward, in `[B, H, S, D]` layout with equal
head counts. This module maps jaxattn inputs onto it; `tpu_reasons` lists what it does
not cover, so `supports()` rejects those requests on a TPU. Grouped K/V heads are
repeated for this kernel (it has no GQA). No TPU was available to measure or compile
it: it is tested on CPU through the Pallas TPU interpreter (`interpret=True`).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxattn import AttentionInputs, AttentionRequest, mask_parts

TPU_DTYPES = ("bfloat16", "float32")


def _block(length: int) -> int | None:
    """The kernel's block along a sequence: 512/256/128 dividing it, or the whole of a short one."""
    if length <= 128:
        return length
    for b in (512, 256, 128):
        if length % b == 0:
            return b
    return None


def tpu_reasons(request: AttentionRequest) -> list[str]:
    """What the wrapped TPU kernel cannot do for `request`."""
    reasons = []
    if request.dtype not in TPU_DTYPES:
        reasons.append(f"flash on TPU takes bfloat16 or float32, not {request.dtype}")
    kinds = request.mask_kinds - {"full"}
    for kind in sorted(kinds - {"causal", "segment", "dense", "or"}):  # dense/or: rejected on every platform
        reasons.append(f"flash on TPU has no {kind} mask (jax's TPU kernel knows causal and segment ids)")
    if "causal" in kinds and request.q_len != request.kv_len:
        reasons.append("flash on TPU needs q_len == kv_len for causal masks")
    for flag, what in (("logits_soft_cap", "logits soft-cap"), ("has_sinks", "sinks"),
                       ("q_seq_lengths", "query sequence lengths"), ("kv_seq_lengths", "key/value sequence lengths"),
                       ("return_lse", "return_lse")):
        if getattr(request, flag):
            reasons.append(f"flash on TPU has no {what}")
    if request.value_head_dim != request.head_dim:
        reasons.append("flash on TPU needs value head_dim == head_dim")
    for name, length in (("q_len", request.q_len), ("kv_len", request.kv_len)):
        if _block(length) is None:
            reasons.append(f"flash on TPU needs {name} <= 128 or a multiple of 128, got {length}")
    return reasons


@dataclass(frozen=True)
class _TpuCall:
    causal: bool
    scale: float
    block_q: int
    block_kv: int
    interpret: bool


def _context(cfg: _TpuCall):
    if not cfg.interpret:
        return contextlib.nullcontext()
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.force_tpu_interpret_mode()


def _kernel(cfg: _TpuCall, q, k, v, q_seg, kv_seg):
    from jax.experimental.pallas.ops.tpu import flash_attention as tfa

    bq, bk = cfg.block_q, cfg.block_kv
    sizes = tfa.BlockSizes(
        block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
        block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
        block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq,
    )
    seg = None if q_seg is None else tfa.SegmentIds(q=q_seg, kv=kv_seg)
    return tfa.flash_attention(q, k, v, None, seg, causal=cfg.causal, sm_scale=cfg.scale, block_sizes=sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _interpreted(cfg: _TpuCall, q, k, v, q_seg, kv_seg):
    """The kernel under the TPU interpreter, forward and backward (each pass enters the
    interpreter itself: JAX traces the backward after the forward's context has closed)."""
    with _context(cfg):
        return _kernel(cfg, q, k, v, q_seg, kv_seg)


def _interpreted_fwd(cfg, q, k, v, q_seg, kv_seg):
    return _interpreted(cfg, q, k, v, q_seg, kv_seg), (q, k, v, q_seg, kv_seg)


def _interpreted_bwd(cfg, residuals, d_out):
    q, k, v, q_seg, kv_seg = residuals
    with _context(cfg):
        _, vjp = jax.vjp(lambda q, k, v: _kernel(cfg, q, k, v, q_seg, kv_seg), q, k, v)
        dq, dk, dv = vjp(d_out)
    return dq, dk, dv, None, None


_interpreted.defvjp(_interpreted_fwd, _interpreted_bwd)


def tpu_flash_attention(inputs: AttentionInputs, *, interpret: bool = False):
    """`(out [B, Sq, Hq, D], None)` through jax's TPU flash-attention kernel."""
    request = AttentionRequest.from_inputs(inputs)
    reasons = tpu_reasons(request)
    if inputs.bias is not None or inputs.dropout_rate > 0.0:
        reasons.append("flash on TPU has no bias or dropout")
    q, k, v = inputs.query, inputs.key, inputs.value
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    parts = mask_parts(inputs.mask, sq, skv)
    causal = parts.band_hi is not None
    if parts.band_lo is not None or (causal and parts.band_hi != 0) or parts.chunk_size or parts.dense is not None:
        reasons.append("flash on TPU covers full and causal (q_len == kv_len) masks only")
    if reasons:
        raise NotImplementedError("; ".join(reasons))
    if hkv != hq:  # jax's TPU kernel has equal head counts
        k = jnp.repeat(k, hq // hkv, axis=2)
        v = jnp.repeat(v, hq // hkv, axis=2)
    cfg = _TpuCall(causal=causal, scale=float(inputs.scale), block_q=_block(sq), block_kv=_block(skv),
                   interpret=interpret)
    q_seg = kv_seg = None
    if parts.q_segment_ids is not None:
        q_seg = parts.q_segment_ids.astype(jnp.int32)
        kv_seg = parts.kv_segment_ids.astype(jnp.int32)
    args = [x.transpose(0, 2, 1, 3) for x in (q, k, v)]
    fn = _interpreted if interpret else _kernel
    out = fn(cfg, *args, q_seg, kv_seg)
    return out.transpose(0, 2, 1, 3), None
