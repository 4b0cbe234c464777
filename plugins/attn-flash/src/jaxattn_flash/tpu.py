"""flash on TPU: our Pallas TPU kernels (`tpu_kernels.py`) behind jaxattn's inputs.

Every feature flash has on a GPU: native GQA/MQA, causal (any offset, q_len != kv_len),
sliding windows (symmetric or not), chunked causal, segment ids, query and key/value
sequence lengths, logits soft-cap, sinks (with their gradient), `return_lse`, a value
head_dim different from the query/key one, bfloat16 and float32. Not float16 (TPU
matrix units take bf16/f32; an f16 lowering is not something we could verify) and, as
on GPUs, no bias, dropout, dense or `|` masks.

TPU shape rules are met by padding: head_dim to a multiple of 128 (lanes), sequences to
a multiple of the blocks; blocks are powers of two >= 128 on both sequences (so every
tile, lse row and id row is (8, 128)-aligned; a decode query is one padded 128-row block).
Inputs are transposed to `[B, H, S, D]` for the kernels (one XLA transpose each way).

Block sizes: `metadata.operation_configs["flash"]` keys `block_q`, `block_kv` (forward),
`block_q_dq`, `block_kv_dq`, `block_q_dkv`, `block_kv_dkv` (the GPU's `num_warps*` /
`num_stages*` keys are ignored here). Defaults per TPU generation are in
`TPU_DEFAULTS`; they are NOT measured (no TPU was available): they follow jax's TPU
kernels' usual sizes, and `block_q` (then `block_kv`) is halved until the kernel's
estimated VMEM footprint fits `VMEM_BUDGET`. Nothing here was compiled for a real TPU;
the kernels are tested on CPU through the Pallas interpreters (`INTERPRETER`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn import EMPTY, FULL, PARTIAL, AttentionInputs, AttentionRequest, Mask, OperationMetadata, mask_parts
from jaxattn import hardware as _hardware

from . import config as _gpu_config
from ._compat import tpu_interpret
from .padding import pad_axis, round_up
from .tpu_kernels import Plan, TpuSpec, attend

TPU_DTYPES = ("bfloat16", "float32")
LANES = 128
MIN_BLOCK = 128
VMEM_BUDGET = 16 * 1024 * 1024  # the default scoped VMEM limit of v4/v5 Mosaic kernels
KERNELS = ("fwd", "dq", "dkv")
_SUFFIX = {"fwd": "", "dq": "_dq", "dkv": "_dkv"}

INTERPRETER = "tpu"
"""What `FlashAttention(interpret=True)` runs the TPU kernels through: "tpu", the Pallas
TPU interpreter (`pltpu.InterpretParams`: simulated VMEM/SMEM and DMAs, scratch filled
with NaN, out-of-bounds reads raise), or "generic", Pallas's HLO interpreter (about
twice as fast to compile and run, less faithful)."""

# TPU generation -> kernel -> (block_q, block_kv). Unmeasured defaults (see module doc).
TPU_DEFAULTS: dict[int, dict[str, tuple[int, int]]] = {
    4: {"fwd": (256, 512), "dq": (256, 256), "dkv": (256, 256)},
    5: {"fwd": (256, 512), "dq": (256, 256), "dkv": (256, 256)},
    6: {"fwd": (512, 512), "dq": (256, 512), "dkv": (512, 256)},
}


def _defaults(generation: int | None) -> dict[str, tuple[int, int]]:
    known = [g for g in TPU_DEFAULTS if generation is not None and g <= generation]
    return TPU_DEFAULTS[max(known)] if known else TPU_DEFAULTS[5]


def vmem_bytes(kernel: str, *, group: int, block_q: int, block_kv: int, head_dim: int, value_head_dim: int,
               itemsize: int) -> int:
    """Estimated VMEM of one kernel: double-buffered blocks, scratch, float32 tile temporaries."""
    g, bq, bk = group, block_q, block_kv
    d, dv = round_up(head_dim, LANES), round_up(value_head_dim, LANES)
    tiles = 4 * 4 * bq * bk
    if kernel == "fwd":
        blocks = g * bq * d + bk * d + bk * dv + g * bq * dv
        return 2 * itemsize * blocks + 4 * (g * bq * dv + (2 * g + 1) * bq * LANES) + tiles
    if kernel == "dq":
        blocks = 2 * g * bq * d + bk * d + bk * dv + g * bq * dv
        return 2 * itemsize * blocks + 4 * g * bq * d + tiles
    blocks = g * bq * d + g * bq * dv + 2 * bk * d + 2 * bk * dv
    return 2 * itemsize * blocks + 4 * bk * (d + dv) + tiles


def _block_value(config: Mapping[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_BLOCK or value & (value - 1):
        raise ValueError(f"metadata.operation_configs['flash'][{key!r}] must be a power of two >= {MIN_BLOCK} "
                         f"on TPU (blocks tile the 128-lane axis), got {value!r}")
    return value


def tpu_config(config: Mapping[str, Any], *, generation: int | None, head_dim: int, value_head_dim: int,
               group: int, q_len: int, kv_len: int, itemsize: int) -> dict[str, tuple[int, int]]:
    """`{kernel: (block_q, block_kv)}` for one call: config or generation defaults, clipped
    to the sequences, then `block_q`, then `block_kv` halved (not below 128) until the VMEM
    estimate fits `VMEM_BUDGET`."""
    _gpu_config.validate(config)  # every key known and of its form; the TPU's own limits below
    table = _defaults(generation)
    sizes = dict(group=group, head_dim=head_dim, value_head_dim=value_head_dim, itemsize=itemsize)
    blocks = {}
    for kernel in KERNELS:
        sfx = _SUFFIX[kernel]
        bq = _block_value(config, f"block_q{sfx}", table[kernel][0])
        bk = _block_value(config, f"block_kv{sfx}", table[kernel][1])
        bq = min(bq, max(MIN_BLOCK, _gpu_config.next_pow2(q_len)))
        bk = min(bk, max(MIN_BLOCK, _gpu_config.next_pow2(kv_len)))
        while bq > MIN_BLOCK and vmem_bytes(kernel, block_q=bq, block_kv=bk, **sizes) > VMEM_BUDGET:
            bq //= 2
        while bk > MIN_BLOCK and vmem_bytes(kernel, block_q=bq, block_kv=bk, **sizes) > VMEM_BUDGET:
            bk //= 2
        blocks[kernel] = (bq, bk)
    return blocks


def _plan(mask: Mask | None, q_len: int, kv_len: int, q_pad: int, kv_pad: int, bq: int, bk: int,
          *, outer_kv: bool) -> Plan:
    """The tile table of one kernel from the core mask's block structure (keys past
    kv_len make the last kv block partial; blocks that are all padding are empty)."""
    nq, nk = q_pad // bq, kv_pad // bk
    classes = np.full((nq, nk), EMPTY, np.int8)
    real = (-(-q_len // bq), -(-kv_len // bk))
    if mask is None:
        classes[: real[0], : real[1]] = FULL
    else:
        classes[: real[0], : real[1]] = mask.block_structure(q_len, kv_len, bq, bk)
    if kv_len % bk:
        last = classes[:, real[1] - 1]
        classes[:, real[1] - 1] = np.where(last == FULL, PARTIAL, last)
    if outer_kv:
        classes = classes.T
    rows = []
    for row in classes:
        inner = np.nonzero(row != EMPTY)[0]
        rows.append([int(b) * 2 + int(row[b] == PARTIAL) for b in inner])
    steps = max(1, max(len(r) for r in rows))
    table = []
    for r in rows:
        table += r + [r[-1] if r else 0] * (steps - len(r))
    return Plan(block_q=bq, block_kv=bk, table=tuple(table), counts=tuple(len(r) for r in rows), steps=steps)


def tpu_reasons(request: AttentionRequest) -> list[str]:
    """What flash's TPU kernels cannot do for `request` (beyond what flash rejects everywhere)."""
    reasons = []
    if request.dtype not in TPU_DTYPES:
        reasons.append(f"flash on TPU takes bfloat16 or float32, not {request.dtype} "
                       "(TPU matrix units have no float16 path in Pallas TPU kernels; cast to bfloat16)")
    group = max(1, request.num_q_heads // max(1, request.num_kv_heads))
    itemsize = 2 if request.dtype != "float32" else 4
    bq = MIN_BLOCK
    need = max(vmem_bytes(k, group=group, block_q=bq, block_kv=MIN_BLOCK, head_dim=request.head_dim,
                          value_head_dim=request.value_head_dim, itemsize=itemsize) for k in KERNELS)
    if need > VMEM_BUDGET:
        reasons.append(f"flash on TPU keeps the {group} query heads of a kv head in one block: with head_dim "
                       f"{request.head_dim}/{request.value_head_dim} even {bq}x{MIN_BLOCK} tiles need "
                       f"~{need >> 20} MiB of VMEM (> {VMEM_BUDGET >> 20} MiB)")
    return reasons


def _interpret_value(interpret: bool) -> Any:
    if not interpret:
        return False
    if INTERPRETER not in ("tpu", "generic"):
        raise ValueError(f"jaxattn_flash.tpu.INTERPRETER must be 'tpu' or 'generic', got {INTERPRETER!r}")
    return tpu_interpret() if INTERPRETER == "tpu" else True


def _generation() -> int | None:
    hw = _hardware.current()
    return hw.tpu_generation if hw.platform == "tpu" else None


def tpu_flash_attention(inputs: AttentionInputs, metadata: OperationMetadata | None = None, *,
                        interpret: bool = False):
    """`(out [B, Sq, Hq, Dv], lse [B, Hq, Sq] or None)` through flash's Pallas TPU kernels.

    `interpret=True` runs them through the Pallas TPU interpreter (any platform). Only for
    calls `FlashAttention.supports()` accepts on a TPU (its forward is called after that check)."""
    metadata = metadata or OperationMetadata()
    q, k, v = inputs.query, inputs.key, inputs.value
    if k.dtype != q.dtype or v.dtype != q.dtype:
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    b, sq, hq, d = q.shape
    _, skv, hkv, dv = v.shape
    parts = mask_parts(inputs.mask, sq, skv)
    blocks = tpu_config(metadata.get_operation_config("flash"), generation=_generation(), head_dim=d,
                        value_head_dim=dv, group=hq // hkv, q_len=sq, kv_len=skv,
                        itemsize=jnp.dtype(q.dtype).itemsize)
    q_pad = round_up(sq, max(bq for bq, _ in blocks.values()))
    kv_pad = round_up(skv, max(bk for _, bk in blocks.values()))
    plans = {kernel: _plan(inputs.mask, sq, skv, q_pad, kv_pad, *blocks[kernel], outer_kv=kernel == "dkv")
             for kernel in KERNELS}
    spec = TpuSpec(
        q_len=sq, kv_len=skv, q_pad=q_pad, kv_pad=kv_pad, group=hq // hkv, scale=float(inputs.scale),
        soft_cap=None if inputs.logits_soft_cap is None else float(inputs.logits_soft_cap),
        band_lo=parts.band_lo, band_hi=parts.band_hi,
        chunk_size=parts.chunk_size, chunk_offset=int(parts.chunk_offset),
        segments=parts.q_segment_ids is not None, kv_lens=inputs.kv_seq_lengths is not None,
        sinks=inputs.sinks is not None, exact=jnp.dtype(q.dtype) == jnp.float32,
        fwd=plans["fwd"], dq=plans["dq"], dkv=plans["dkv"],
        interpret=_interpret_value(interpret),
    )
    dp, dvp = round_up(d, LANES), round_up(dv, LANES)
    qt = pad_axis(pad_axis(q.transpose(0, 2, 1, 3), 2, q_pad), 3, dp)
    kt = pad_axis(pad_axis(k.transpose(0, 2, 1, 3), 2, kv_pad), 3, dp)
    vt = pad_axis(pad_axis(v.transpose(0, 2, 1, 3), 2, kv_pad), 3, dvp)
    q_seg = kv_seg = None
    if spec.segments:
        q_seg = pad_axis(parts.q_segment_ids.astype(jnp.int32), 1, q_pad)[:, None, :]
        kv_seg = pad_axis(parts.kv_segment_ids.astype(jnp.int32), 1, kv_pad)[:, None, :]
    q_end = jnp.full((b,), sq, jnp.int32)
    if inputs.q_seq_lengths is not None:
        q_end = jnp.clip(inputs.q_seq_lengths.astype(jnp.int32), 0, sq)
    kv_end = jnp.full((b,), skv, jnp.int32)
    if inputs.kv_seq_lengths is not None:
        kv_end = jnp.clip(inputs.kv_seq_lengths.astype(jnp.int32), 0, skv)
    out, lse = attend(spec, qt, kt, vt, inputs.sinks, q_seg, kv_seg, q_end, kv_end)
    out = lax.slice(out, (0, 0, 0, 0), (b, hq, sq, dv)).transpose(0, 2, 1, 3)
    lse = lax.slice(lse, (0, 0, 0, 0), (b, hq, 1, sq))[:, :, 0, :]
    return out, (lse if inputs.return_lse else None)
