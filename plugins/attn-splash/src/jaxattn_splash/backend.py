"""The `splash` backend: jax's TPU splash attention behind the jaxattn contract.

Per call (inside `shard_map` when a mesh is set, so everything below sees local heads):

1. the mask is planned (`translate.plan_mask`): a lazy node computed in the kernel,
   the kernel's segment ids, and only as a last resort a dense mask;
2. sequences are padded to multiples of 128 (padded keys are masked by the node);
3. `MaskInfo` for the forward, dQ and dK/dV kernels comes from the cached builder
   (`mask_info.lazy_mask_info`), or from splash's dynamic-mask path for dense masks;
4. queries are pre-scaled (splash computes `q·kᵀ` unscaled), the batch is `vmap`ped over
   the one-example kernel (`kernel.splash_attention`), GQA/MQA go through the kernel's
   grouped form (K/V never repeated);
5. rows that saw no key get output 0 and lse -inf; rows past `query_seq_lengths` too;
6. around it all, `jaxattn.value_guard`: the kernel multiplies `p @ v` with `p = 0` on
   masked keys, so a non-finite value of a masked key is zeroed before and the rows that
   see it are made NaN after (README "Semantics").

Sinks run inside the kernel when every row provably sees a key (a pure band/chunk mask:
then the kernel's lse, which includes the sink, cannot hide a dead row); otherwise the
kernel runs without them and they are applied exactly afterwards from the lse:
`out · sigmoid(lse − s)`, `lse ← logaddexp(lse, s)`.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import (
    FEATURES,
    AttentionInputs,
    AttentionRequest,
    BackendConfig,
    Capabilities,
    Hardware,
    OperationImpl,
    OperationMetadata,
    Support,
    value_guard,
)
from jaxattn.masks import Mask

from . import _compat, config, kernel, lazy, translate
from .mask_info import lazy_mask_info

MIN_SEQ = 64  # below this, padding to 128 rows/keys would more than double the work
DTYPES = ("float32", "bfloat16")
HEAD_DIM_MULTIPLE = 64


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class SplashAttention(OperationImpl):
    """TPU splash (block-sparse) attention. `SplashAttention(interpret=True)` runs the same
    kernels through the Pallas interpreter on any platform (slow; for tests). `interpret`
    may also be a `pltpu.InterpretParams`."""

    name: ClassVar[str] = "splash"
    aliases: ClassVar[tuple[str, ...]] = ("blocksparse",)
    op: ClassVar[str] = "attention"
    platforms: ClassVar[tuple[str, ...]] = ("tpu",)
    priority: ClassVar[dict[str, int]] = {"tpu": 100}
    partitioning: ClassVar[str] = "shard"  # Pallas kernels: run per shard under plain jit
    config_class: ClassVar[type[BackendConfig] | None] = config.SplashConfig
    capabilities: ClassVar[Capabilities] = Capabilities(
        dtypes=DTYPES, same_dtype=True, head_dim_multiple=HEAD_DIM_MULTIPLE,
        features=frozenset(FEATURES) - {"bias", "dropout"},
        notes={"bias": "express it as a mask, or use another backend",
               "head_dim": "the head sizes jax's splash kernel is built and tested for: 64, 128, 192, 256..."},
    )

    def __init__(self, interpret: Any = False) -> None:
        self.interpret = interpret

    # -- what it can do -------------------------------------------------------------------
    def is_available(self, hardware: Hardware) -> Support:
        reasons = []
        if _compat.KERNEL_ERROR:
            reasons.append(_compat.KERNEL_ERROR)
        if not self.interpret:
            if hardware.platform != "tpu":
                reasons.append(
                    f"splash needs a TPU (jax's Pallas TPU kernels); on {hardware.platform} it only runs "
                    "through the slow Pallas interpreter (SplashAttention(interpret=True), for tests)")
            elif hardware.tpu_generation is not None and hardware.tpu_generation < 4:
                reasons.append(f"splash needs TPU v4 or newer (Pallas TPU kernels); this is "
                               f"{hardware.device_kind} (v{hardware.tpu_generation})")
        return Support.from_reasons(reasons)

    def extra_reasons(self, request: AttentionRequest, hardware: Hardware) -> list[str]:
        return [f"{label}={length} < {MIN_SEQ}: splash tiles sequences by 128, so most of the work would be "
                "padding (decode belongs to a paged/decode backend)"
                for label, length in (("q_len", request.q_len), ("kv_len", request.kv_len)) if length < MIN_SEQ]

    # -- what it computes -----------------------------------------------------------------
    def forward_tpu(self, inputs: AttentionInputs, metadata: OperationMetadata) -> Any:
        return _guarded(inputs, metadata, self.interpret, _hardware_or_none())

    def forward_native(self, inputs: AttentionInputs, metadata: OperationMetadata) -> Any:
        if not self.interpret:
            raise RuntimeError("splash runs on TPU only; use SplashAttention(interpret=True) to run it "
                               "through the Pallas interpreter elsewhere")
        return _guarded(inputs, metadata, self.interpret, None)


def _guarded(inputs: AttentionInputs, metadata: OperationMetadata, interpret: Any,
             hardware: Hardware | None) -> Any:
    """jax's splash kernel multiplies p @ v with p = 0 on masked keys: the guard keeps a
    non-finite value of a masked key from the rows that do not see it (README "Semantics"). A
    TPU's `lax.cond` does not wait for the host: the guard keeps it at every size."""
    return value_guard.guarded(lambda clean: _attention(clean, metadata, interpret, hardware), inputs,
                               branchless_bytes=0)


def _hardware_or_none() -> Hardware | None:
    from jaxattn import hardware as hw

    try:
        return hw.current()
    except Exception:  # noqa: BLE001 - block defaults only
        return None


# -- the call -------------------------------------------------------------------------------


def _segment_ids(plan: translate.MaskPlan, inputs: AttentionInputs, b: int, sq: int, skv: int,
                 sq_p: int, skv_p: int) -> tuple[jax.Array, jax.Array] | None:
    """Per-example q/kv segment ids `[B, S_padded]` (int32), or None when not needed.

    `key_value_seq_lengths` become a kv id that no query has: the (row's) smallest query
    id minus one, or 1 against query id 0 when there are no segments."""
    seg, kv_lens = plan.segments, inputs.kv_seq_lengths
    if seg is None and kv_lens is None:
        return None
    if seg is not None:
        q_ids = jnp.asarray(seg.q_segment_ids, jnp.int32)
        kv_ids = jnp.asarray(seg.kv_segment_ids, jnp.int32)
    else:
        q_ids = jnp.zeros((b, sq), jnp.int32)
        kv_ids = jnp.zeros((b, skv), jnp.int32)
    if kv_lens is not None:
        outside = jnp.min(q_ids, axis=1, keepdims=True) - 1
        kv_ids = jnp.where(jnp.arange(skv)[None, :] < kv_lens[:, None], kv_ids, outside)
    q_ids = jnp.pad(q_ids, ((0, 0), (0, sq_p - sq)), mode="edge")
    kv_ids = jnp.pad(kv_ids, ((0, 0), (0, skv_p - skv)), mode="edge")  # padded keys: masked by the node
    return q_ids, kv_ids


def _dense_mask(plan: translate.MaskPlan, node: lazy.Node, b: int, h: int, sq: int, skv: int,
                sq_p: int, skv_p: int) -> jax.Array:
    """The last resort: `[B|1, H|1, Sq_p, Skv_p]` bool of the lazy node and dense parts."""
    allowed: Any = None
    for part in plan.dense:
        m = part.materialize(sq, skv)
        allowed = m if allowed is None else allowed & m
    qi = jnp.arange(sq_p, dtype=jnp.int32)[:, None]
    kj = jnp.arange(skv_p, dtype=jnp.int32)[None, :]
    lazy_part = node(qi, kj) & (kj < skv) & (qi >= 0)
    allowed = jnp.pad(allowed, ((0, 0), (0, 0), (0, sq_p - sq), (0, skv_p - skv)))
    return allowed & lazy_part[None, None]


def _dynamic_infos(dense: jax.Array, bs: Any) -> tuple[Any, Any, Any]:
    """splash's dynamic-mask `MaskInfo`s for one example's `[H|1, Sq, Skv]` mask."""
    fwd, _ = _compat.process_dynamic_mask(dense, (bs.block_q, bs.block_kv))
    dq = None
    if not bs.use_fused_bwd_kernel:
        dq, _ = _compat.process_dynamic_mask(dense, (bs.block_q_dq, bs.block_kv_dq))
    dkv, _ = _compat.process_dynamic_mask_dkv(dense, (bs.block_q_dkv, bs.block_kv_dkv))
    return fwd, dq, dkv


def _lazy_infos(node: lazy.Node, sq_p: int, skv_p: int, bs: Any) -> tuple[Any, Any, Any]:
    fwd = lazy_mask_info(node, sq_p, skv_p, bs.block_q, bs.block_kv)
    dq = None
    if not bs.use_fused_bwd_kernel:
        dq = lazy_mask_info(node, sq_p, skv_p, bs.block_q_dq, bs.block_kv_dq)
    dkv = lazy_mask_info(node, sq_p, skv_p, bs.block_q_dkv, bs.block_kv_dkv, dkv=True,
                         shrink=not bs.use_fused_bwd_kernel)
    return tuple(None if i is None else jax.tree_util.tree_map(jnp.asarray, i) for i in (fwd, dq, dkv))


def _attention(inputs: AttentionInputs, metadata: OperationMetadata, interpret: Any,
               hardware: Hardware | None) -> tuple[jax.Array, jax.Array | None]:
    q, k, v = inputs.query, inputs.key, inputs.value  # no bias, no dropout: SplashAttention.capabilities
    b, sq, hq, _ = q.shape
    _, skv, hkv, _ = k.shape
    sq_p, skv_p = config.padded(sq), config.padded(skv)
    bs = config.block_sizes(metadata.get_operation_config("splash"), hardware, sq_p, skv_p)

    plan = translate.plan_mask(inputs.mask, sq, skv)
    node = plan.node
    if skv_p > skv:
        node = lazy.conjoin([node, lazy.KeyBelow(skv)])
    segments = _segment_ids(plan, inputs, b, sq, skv, sq_p, skv_p)

    # Rows that see no key must come out as zeros; when that cannot happen (a pure band/chunk
    # mask that leaves every real row a key) the sinks can run inside the kernel.
    rows = lazy.rows_with_keys(node, sq, skv) if plan.lazy_only and segments is None else None
    every_row_has_a_key = rows is not None and bool(np.all(rows))
    native_sinks = inputs.sinks is not None and every_row_has_a_key

    if plan.dense:
        dense = _dense_mask(plan, node, b, hq, sq, skv, sq_p, skv_p)  # [B|1, H|1, Sq_p, Skv_p]
        infos = jax.vmap(lambda m: _dynamic_infos(m, bs))(dense) if dense.shape[0] > 1 else \
            _dynamic_infos(dense[0], bs)
        info_axis = 0 if dense.shape[0] > 1 else None
        mask_function = None
    else:
        infos = _lazy_infos(node, sq_p, skv_p, bs)
        info_axis = None
        mask_function = None if isinstance(node, lazy.Full) else node

    is_mqa = hkv == 1 and hq > 1
    st = kernel.Static(block_sizes=bs, is_mqa=is_mqa, mask_function=mask_function,
                       soft_cap=inputs.logits_soft_cap, interpret=interpret)

    scaled_q = (q.astype(jnp.float32) * inputs.scale).astype(q.dtype)
    qt = jnp.pad(scaled_q, ((0, 0), (0, sq_p - sq), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kt = jnp.pad(k, ((0, 0), (0, skv_p - skv), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    vt = jnp.pad(v, ((0, 0), (0, skv_p - skv), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    if is_mqa:
        kt, vt = kt[:, 0], vt[:, 0]
    sinks = inputs.sinks.astype(jnp.float32) if native_sinks else None
    seg = None if segments is None else _compat.SegmentIds(q=segments[0], kv=segments[1])

    def one(fwd_i, dq_i, dkv_i, q1, k1, v1, seg1):
        return kernel.splash_attention(st, fwd_i, dq_i, dkv_i, q1, k1, v1, seg1, sinks)

    fwd_info, dq_info, dkv_info = infos
    if b == 1 and info_axis is None:  # no vmap: also what pltpu.InterpretParams can run
        first = functools.partial(jax.tree_util.tree_map, lambda x: x[0])
        out, lse = one(fwd_info, dq_info, dkv_info, qt[0], kt[0], vt[0], None if seg is None else first(seg))
        out, lse = out[None], lse[None]
    else:
        out, lse = jax.vmap(one, in_axes=(info_axis, info_axis, info_axis, 0, 0, 0, 0 if seg is not None else None))(
            fwd_info, dq_info, dkv_info, qt, kt, vt, seg)
    out, lse = out[:, :, :sq], lse[:, :, :sq]  # [B, Hq, Sq, Dv], [B, Hq, Sq]

    if not every_row_has_a_key:
        dead = kernel.dead_rows(lse)
        out = jnp.where(dead[..., None], 0, out)
        lse = jnp.where(dead, -jnp.inf, lse)
    if inputs.sinks is not None and not native_sinks:
        s = inputs.sinks.astype(jnp.float32)[None, :, None]
        out = (out.astype(jnp.float32) * jax.nn.sigmoid(lse - s)[..., None]).astype(out.dtype)
        lse = jnp.where(jnp.isneginf(lse), -jnp.inf, jnp.logaddexp(lse, s))
    if inputs.q_seq_lengths is not None:
        live = jnp.arange(sq)[None, None, :] < inputs.q_seq_lengths[:, None, None]
        out = jnp.where(live[..., None], out, 0)
        lse = jnp.where(live, lse, -jnp.inf)
    out = out.transpose(0, 2, 1, 3).astype(v.dtype)
    return out, (lse if inputs.return_lse else None)


def describe_mask(mask: Mask | None, q_len: int, kv_len: int) -> str:
    """How splash will run `mask`: 'lazy', 'lazy + segment ids' or 'dense (last resort)'."""
    plan = translate.plan_mask(mask, q_len, kv_len)
    if plan.dense:
        return "dense (last resort: q_len x kv_len booleans per distinct batch/head mask)"
    return "lazy" + (" + segment ids" if plan.segments is not None else "")
