"""The `flash` backend: what it accepts, its settings (`FlashConfig`) and what `jaxattn tune`
tries of them, and how a call reaches the kernels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax

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
    mask_parts,
    value_guard,
)
from jaxattn import hardware as _hardware

from . import config as _config
from . import gpu_path
from .padding import pad_axis, round_up
from .tpu import tpu_flash_attention, tpu_reasons
from .triton_kernels import KernelSpec
from .triton_vjp import Residuals, _flash_bwd, flash

DTYPES = ("float16", "bfloat16", "float32")
MAX_HEAD_DIM = 256
MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class _Call:
    """One call, ready for the kernels: the static spec and path, and the (padded) arrays."""

    spec: KernelSpec
    mosaic: Any  # the MosaicSpec when the Mosaic GPU forward runs, else None
    q: jax.Array
    k: jax.Array
    v: jax.Array
    sinks: jax.Array | None
    q_seg: jax.Array | None
    kv_seg: jax.Array | None
    q_lens: jax.Array | None
    kv_lens: jax.Array | None

    def residuals(self, out: jax.Array, lse: jax.Array) -> Residuals:
        """What the backward takes: the forward's inputs, out and lse (padded like them; the
        Mosaic path takes no padding)."""
        if self.mosaic is None:
            rows, dim = self.spec.q_pad, self.v.shape[-1]
            out = pad_axis(pad_axis(out, 1, rows), 3, dim)
            lse = jnp.pad(lse, ((0, 0), (0, 0), (0, rows - lse.shape[2])), constant_values=-jnp.inf)
        return Residuals(q=self.q, k=self.k, v=self.v, out=out, lse=lse, sinks=self.sinks, q_seg=self.q_seg,
                         kv_seg=self.kv_seg, q_lens=self.q_lens, kv_lens=self.kv_lens)


def _prepare(inputs: AttentionInputs, metadata: OperationMetadata, interpret: bool, hardware: Hardware | None) -> _Call:
    """Everything both passes need (`capabilities` has admitted the call: no bias, dropout,
    `|` or dense mask)."""
    q, k, v = inputs.query, inputs.key, inputs.value
    b, sq, hq, d = q.shape
    _, skv, hkv, dv = v.shape
    if k.dtype != q.dtype or v.dtype != q.dtype:
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    parts = mask_parts(inputs.mask, sq, skv)  # what FlashAttention.capabilities admits: no `|`, no dense

    config = metadata.get_operation_config("flash")
    request = AttentionRequest.from_inputs(inputs)
    hardware = hardware or _hardware.current()
    path = gpu_path.choose(request, hardware, config, interpret=interpret)
    tiles = _config.resolve(config, max(d, dv), sq, skv)
    q_mult, kv_mult = _config.pad_multiples(tiles)
    q_pad, kv_pad = round_up(sq, q_mult), round_up(skv, kv_mult)

    q_seg = kv_seg = None
    if parts.q_segment_ids is not None:
        q_seg = pad_axis(parts.q_segment_ids.astype(jnp.int32), 1, q_pad)
        kv_seg = pad_axis(parts.kv_segment_ids.astype(jnp.int32), 1, kv_pad)
    q_lens = None if inputs.q_seq_lengths is None else inputs.q_seq_lengths.astype(jnp.int32)
    kv_lens = None if inputs.kv_seq_lengths is None else inputs.kv_seq_lengths.astype(jnp.int32)

    band_lo, band_hi = parts.band_lo, parts.band_hi
    spec = KernelSpec(
        q_len=sq, kv_len=skv, q_pad=q_pad, kv_pad=kv_pad, group=hq // hkv,
        scale=float(inputs.scale),
        soft_cap=None if inputs.logits_soft_cap is None else float(inputs.logits_soft_cap),
        band_lo=band_lo, band_hi=band_hi,
        chunk_size=parts.chunk_size, chunk_offset=int(parts.chunk_offset),
        segments=q_seg is not None, q_lens=q_lens is not None, kv_lens=kv_lens is not None,
        sinks=inputs.sinks is not None,
        fwd=tiles["fwd"], dq=tiles["dq"], dkdv=tiles["dkv"],
        exact=jnp.dtype(q.dtype) == jnp.float32,
        interpret=interpret,
        dkdv_passes=_config.dkv_passes(config, hq // hkv, parts),
    )
    backward = gpu_path.choose_backward(request, hardware, config, interpret=interpret)
    if backward.kernel == "mosaic":
        from .mosaic_bwd_kernels import MosaicBwdSpec

        block_kv_dq, stages_bwd = _config.mosaic_bwd_tiles(config, d, dv)
        spec = replace(spec, mosaic_bwd=MosaicBwdSpec(
            scale=spec.scale, band_lo=band_lo, band_hi=band_hi, soft_cap=spec.soft_cap,
            dq_block_kv=block_kv_dq, stages=stages_bwd, fused_dq=_config.mosaic_fused_dq(
                config, d, dv, bounded=_config.bounds_keys(band_lo, parts.chunk_size)),
            chunk=spec.chunk_size, chunk_offset=spec.chunk_offset, kv_lengths=kv_lens is not None,
            segments=q_seg is not None, passes=_config.mosaic_dkv_passes(config, hq // hkv, parts, d, dv),
            cluster=_config.mosaic_dkv_cluster(config, hq // hkv, parts, d, dv),
            poly_exp2=_config.mosaic_poly_exp2_bwd(config),
            poly_degree=_config.mosaic_poly_degree(config)))
    if path.kernel == "mosaic":
        from .mosaic_kernels import MosaicSpec

        block_kv, stages = _config.mosaic_tiles(config, d, dv, skv, banded=(band_lo, band_hi) != (None, None))
        bounded = _config.softcap_without_max(config, spec.soft_cap, q.dtype, skv)
        mspec = MosaicSpec(scale=spec.scale, band_lo=band_lo, band_hi=band_hi, block_kv=block_kv, stages=stages,
                           soft_cap=spec.soft_cap, sinks=spec.sinks, guard_values=value_guard.hides_keys(inputs),
                           chunk=spec.chunk_size, chunk_offset=spec.chunk_offset,
                           q_lengths=q_lens is not None, kv_lengths=kv_lens is not None, segments=q_seg is not None,
                           cluster=_config.mosaic_fwd_cluster(config, parts),
                           guard_form=_config.mosaic_value_guard(config),
                           bounded_logits=bounded, poly_exp2=_config.mosaic_poly_exp2(config, bounded),
                           poly_degree=_config.mosaic_poly_degree(config), fence=_config.mosaic_fence(config))
        # Unpadded: the Mosaic path takes no padding; the kernel guards the values itself.
        return _Call(spec, mspec, q, k, v, inputs.sinks, q_seg, kv_seg, q_lens, kv_lens)
    dp, dvp = _config.padded_dim(d), _config.padded_dim(dv)
    qp = pad_axis(pad_axis(q, 1, q_pad), 3, dp)
    kp = pad_axis(pad_axis(k, 1, kv_pad), 3, dp)
    vp = pad_axis(pad_axis(v, 1, kv_pad), 3, dvp)
    return _Call(spec, None, qp, kp, vp, inputs.sinks, q_seg, kv_seg, q_lens, kv_lens)


def flash_attention(inputs: AttentionInputs, metadata: OperationMetadata, *, interpret: bool = False,
                    hardware: Hardware | None = None):
    """Run the kernels on `inputs`: `(out [B,Sq,Hq,Dv], lse [B,Hq,Sq])`; on the Mosaic forward
    lse is None unless `inputs.return_lse` (a forward-only call then stores none: 1-2% faster on
    an H200; a differentiated one makes it for the backward).

    The forward kernel is the one `gpu_path.choose` names for this call on `hardware`
    (default: the detected one), the backward the one `gpu_path.choose_backward` names."""
    call = _prepare(inputs, metadata, interpret, hardware)
    if call.mosaic is not None:
        bad = value_guard.bad_keys(inputs.value) if call.mosaic.guard_values else None  # for the backward
        mspec = call.mosaic if inputs.return_lse else replace(call.mosaic, lse=False)
        out, lse = gpu_path.flash_mosaic(call.spec, mspec, call.q, call.k, call.v, call.sinks, call.q_lens,
                                         call.kv_lens, call.q_seg, call.kv_seg, bad)
        return out, (lse if inputs.return_lse else None)
    b, sq, hq, _ = inputs.query.shape
    dv = inputs.value.shape[-1]
    out, lse = flash(call.spec, call.q, call.k, call.v, call.sinks, call.q_seg, call.kv_seg, call.q_lens,
                     call.kv_lens)
    out = lax.slice(out, (0, 0, 0, 0), (b, sq, hq, dv))
    lse = lax.slice(lse, (0, 0, 0), (b, hq, sq))
    return out, lse


def flash_backward(inputs: AttentionInputs, out: jax.Array, lse: jax.Array, d_out: jax.Array, d_lse: jax.Array,
                   metadata: OperationMetadata, *, interpret: bool = False,
                   hardware: Hardware | None = None) -> dict[str, jax.Array]:
    """The gradients of `flash_attention` from its `out` and `lse` (the backward kernels
    `gpu_path.choose_backward` names; no second forward), for the partitioned plain-jit path."""
    call = _prepare(inputs, metadata, interpret, hardware)
    b, sq, hq, d = inputs.query.shape
    _, skv, hkv, dv = inputs.value.shape
    cotangents = (d_out, d_lse)
    if call.mosaic is None:
        cotangents = (pad_axis(pad_axis(d_out, 1, call.spec.q_pad), 3, call.v.shape[-1]),
                      pad_axis(d_lse, 2, call.spec.q_pad))
    dq, dk, dv_, d_sinks, *_ = _flash_bwd(call.spec, call.residuals(out, lse), cotangents)
    grads = {
        "query": lax.slice(dq, (0, 0, 0, 0), (b, sq, hq, d)).astype(inputs.query.dtype),
        "key": lax.slice(dk, (0, 0, 0, 0), (b, skv, hkv, d)).astype(inputs.key.dtype),
        "value": lax.slice(dv_, (0, 0, 0, 0), (b, skv, hkv, dv)).astype(inputs.value.dtype),
    }
    if inputs.sinks is not None:
        grads["sinks"] = d_sinks
    return grads


class FlashAttention(OperationImpl):
    """FlashAttention-2 in Pallas (Triton lowering), forward and backward.

    `FlashAttention(interpret=True)` runs the same kernels through the Pallas
    interpreter on any platform (CPU tests); the registered instance needs a GPU.
    """

    name: ClassVar[str] = "flash"
    aliases: ClassVar[tuple[str, ...]] = ("flash_attn2",)
    op: ClassVar[str] = "attention"
    platforms: ClassVar[tuple[str, ...]] = ("gpu", "tpu")
    priority: ClassVar[dict[str, int]] = {"gpu": 100, "tpu": 50}
    partitioning: ClassVar[str] = "shard"  # Pallas kernels: run per batch/head shard under plain jit
    config_class: ClassVar[type[BackendConfig] | None] = _config.FlashConfig
    capabilities: ClassVar[Capabilities] = Capabilities(
        dtypes=DTYPES, same_dtype=True, max_head_dim=MAX_HEAD_DIM,
        mask_kinds=frozenset({"full", "causal", "sliding_window", "chunked_causal", "segment"}),
        features=frozenset(FEATURES) - {"bias", "dropout"},
        notes={"bias": "use cudnn or xla", "dropout": "use xla",
               "dense": "flash takes causal, sliding-window, chunked and segment masks"},
    )

    def __init__(self, interpret: bool = False) -> None:
        self.interpret = bool(interpret)

    def is_available(self, hardware: Hardware) -> Support:
        if self.interpret:
            return Support.yes()
        if hardware.platform == "cpu":
            return Support.no(
                "flash needs a GPU or TPU (this machine is cpu; on CPU its kernels run only in the "
                "Pallas interpreter: FlashAttention(interpret=True))"
            )
        if hardware.platform == "tpu":
            return Support.yes()
        if not hardware.is_cuda:
            return Support.no(f"flash's Triton kernels are built and tested for NVIDIA GPUs, "
                              f"not {hardware.gpu_vendor or 'this'} GPUs")
        cc = hardware.compute_capability
        if cc is not None and tuple(cc) < MIN_CAPABILITY:
            return Support.no(f"flash needs compute capability >= 8.0 (bf16 tensor cores); "
                              f"this GPU has {cc[0]}.{cc[1]}")
        return Support.yes()

    def extra_reasons(self, request: AttentionRequest, hardware: Hardware) -> list[str]:
        return tpu_reasons(request) if hardware.platform == "tpu" else []

    def tuning_space(self, request: AttentionRequest, hardware: Hardware) -> Sequence[Mapping[str, Any]]:
        """On an NVIDIA GPU: the defaults, the Triton forward or backward where Mosaic is the
        default, the plain dk/dv launch order where 4 passes are (`config.tuning_space`);
        elsewhere the defaults."""
        if not hardware.is_cuda or self.interpret:
            return ({},)
        mosaic = gpu_path.choose(request, hardware, {}).kernel == "mosaic"
        mosaic_bwd = gpu_path.choose_backward(request, hardware, {}).kernel == "mosaic"
        return _config.tuning_space(request, mosaic_by_default=mosaic, mosaic_backward_by_default=mosaic_bwd)

    def gpu_kernel_for(self, request: AttentionRequest, hardware: Hardware,
                       metadata: OperationMetadata | None = None) -> gpu_path.PathChoice:
        """Which forward kernel (Triton or Mosaic GPU) `request` takes on `hardware`, and why.
        Raises ValueError when the config forces "mosaic" on a call it cannot serve."""
        config = (metadata or OperationMetadata()).get_operation_config("flash")
        return gpu_path.choose(request, hardware, config, interpret=self.interpret)

    def gpu_backward_for(self, request: AttentionRequest, hardware: Hardware,
                         metadata: OperationMetadata | None = None) -> gpu_path.PathChoice:
        """Which backward kernels (Triton or Mosaic GPU) `request` takes on `hardware`, and why.
        Raises ValueError when the config forces "mosaic" on a call it cannot serve."""
        config = (metadata or OperationMetadata()).get_operation_config("flash")
        return gpu_path.choose_backward(request, hardware, config, interpret=self.interpret)

    def _run(self, inputs: AttentionInputs, metadata: OperationMetadata, hardware: Hardware | None = None):
        out, lse = flash_attention(inputs, metadata, interpret=self.interpret, hardware=hardware)
        return out, (lse if inputs.return_lse else None)

    def dispatch(self, inputs, metadata: OperationMetadata, hardware: Hardware):
        if hardware.platform == "gpu" and not hardware.is_rocm:
            return self._run(inputs, metadata, hardware)  # the GPU path choice needs the hardware
        return super().dispatch(inputs, metadata, hardware)

    def backward(self, inputs, out, lse, d_out, d_lse, metadata, hardware):
        if hardware.platform == "tpu":
            return None  # the TPU kernels keep their own residuals: recompute on each shard
        return flash_backward(inputs, out, lse, d_out, d_lse, metadata, interpret=self.interpret,
                              hardware=hardware if hardware.platform == "gpu" else None)

    def forward_native(self, inputs: AttentionInputs, metadata: OperationMetadata):
        if not self.interpret:
            raise NotImplementedError(
                "flash runs on NVIDIA GPUs; on other platforms use FlashAttention(interpret=True)")
        return self._run(inputs, metadata)

    def forward_gpu(self, inputs: AttentionInputs, metadata: OperationMetadata):
        return self._run(inputs, metadata)

    def forward_tpu(self, inputs: AttentionInputs, metadata: OperationMetadata):
        """flash's own Pallas TPU kernels (see `tpu.py`, `tpu_kernels.py`)."""
        return tpu_flash_attention(inputs, metadata, interpret=self.interpret)

    def __repr__(self) -> str:
        extra = " interpret" if self.interpret else ""
        return f"<FlashAttention {self.name!r}{extra}>"
