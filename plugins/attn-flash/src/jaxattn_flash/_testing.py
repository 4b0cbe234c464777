"""Test helpers (used by this plugin's tests): the conformance cases flash declares, and
requests for `supports()`/path checks without building arrays."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

import jaxattn
from jaxattn import AttentionRequest, OperationMetadata

# Every platform (GPU Triton, TPU) declares the same cases.
DECLARED = [
    "full", "causal", "causal_q_lt_kv", "causal_top_left", "gqa", "mqa", "sliding_window",
    "sliding_window_asym", "chunked_causal", "segment_ids", "seq_lengths", "soft_cap", "sinks",
    "fully_masked_rows", "return_lse", "value_head_dim", "decode",
]
REJECTED = ["bias", "bool_mask", "or_mask", "dropout", "query_positions"]


def tiles(size: int) -> dict[str, dict[str, int]]:
    """`operation_configs` giving every flash kernel (forward, dq, dk/dv) `size` x `size` tiles:
    small tiles make several blocks of small test shapes."""
    return {"flash": {f"{b}{s}": size for b in ("block_q", "block_kv") for s in ("", "_dq", "_dkv")}}


def request(**fields: Any) -> AttentionRequest:
    """A bf16 causal GQA training request (2, 1024, 8 q / 2 kv heads, 128), `fields` changed."""
    base: dict[str, Any] = dict(
        batch=2, q_len=1024, kv_len=1024, num_q_heads=8, num_kv_heads=2, head_dim=128, value_head_dim=128,
        dtype="bfloat16", kv_dtype="bfloat16", mask_kinds=frozenset({"causal"}), needs_grad=True)
    base.update(fields)
    return AttentionRequest(**base)


def peers_request(**fields: Any) -> AttentionRequest:
    """`request` at the peers-table shape (4, 4096, 32 q / 8 kv heads, 128)."""
    return request(**{"batch": 4, "q_len": 4096, "kv_len": 4096, "num_q_heads": 32, "num_kv_heads": 8, **fields})


def flash_metadata(**config: Any) -> OperationMetadata:
    """Metadata whose `operation_configs["flash"]` is `config`."""
    return OperationMetadata(operation_configs={"flash": config})


def on_hopper() -> bool:
    """Whether this process runs on a Hopper GPU (compute capability 9.x): the Mosaic paths' GPU tests."""
    return jax.default_backend() == "gpu" and jaxattn.hardware.current().is_hopper


# Forward spec fields of the Mosaic kernels lowered for CUDA on CPU (tests/test_flash_mosaic_kernels.py,
# bench/lowering_fingerprint.py): head_dim 128 unless named; "passes" and "dkv_cluster" are the
# backward's dk/dv launch passes and clusters.
MOSAIC_LOWERINGS: dict[str, dict[str, Any]] = {
    "causal": dict(band_lo=None, band_hi=0),
    "full-d64": dict(band_lo=None, band_hi=None, head_dim=64, block_kv=256),  # MOSAIC_FULL_DEFAULTS
    "causal-guarded-d256-passes": dict(band_lo=None, band_hi=0, guard_values=True, head_dim=256, block_kv=64,
                                       passes=4),
    "window-softcap-lengths-d256": dict(band_lo=-200, band_hi=0, soft_cap=30.0, kv_lengths=True, head_dim=256,
                                        block_kv=64),
    "chunked-d256": dict(band_lo=None, band_hi=0, chunk=192, head_dim=256, block_kv=64),
    "segments-causal-lengths-d256": dict(band_lo=None, band_hi=0, segments=True, kv_lengths=True, head_dim=256,
                                         block_kv=64),
    "causal-guarded-passes": dict(band_lo=None, band_hi=0, guard_values=True, passes=4),
    "causal-guarded-flags-d64": dict(band_lo=None, band_hi=0, guard_values=True, guard_form="flags", head_dim=64),
    "window-guarded-every-block": dict(band_lo=-200, band_hi=0, guard_values=True, guard_form="every block"),
    "causal-clusters": dict(band_lo=None, band_hi=0, cluster=4, dkv_cluster=2),
    "window-guarded-softcap": dict(band_lo=-200, band_hi=0, guard_values=True, soft_cap=30.0),
    "chunked-guarded-sinks": dict(band_lo=None, band_hi=0, guard_values=True, chunk=192, sinks=True),
    "lengths-guarded": dict(band_lo=None, band_hi=0, guard_values=True, q_lengths=True, kv_lengths=True),
    "segments-full-d64": dict(band_lo=None, band_hi=None, segments=True, head_dim=64, block_kv=256),
    "segments-causal-guarded-lengths": dict(band_lo=None, band_hi=0, guard_values=True, segments=True,
                                            kv_lengths=True),
    "mla-192-128-causal-guarded": dict(band_lo=None, band_hi=0, guard_values=True, head_dim=192,
                                       value_head_dim=128, block_kv=64),
    "d64-dv128-window-guarded": dict(band_lo=-200, band_hi=0, guard_values=True, head_dim=64, value_head_dim=128),
    "d128-dv64-full": dict(band_lo=None, band_hi=None, value_head_dim=64),
    "d256-dv128-window": dict(band_lo=-200, band_hi=0, head_dim=256, value_head_dim=128, block_kv=64),
    "d128-dv256-full": dict(band_lo=None, band_hi=None, head_dim=128, value_head_dim=256, block_kv=64),
    # soft-capped logits without a running max
    "causal-softcap-bounded": dict(band_lo=None, band_hi=0, soft_cap=30.0, bounded_logits=True),
    "window-guarded-softcap-bounded-sinks": dict(band_lo=-200, band_hi=0, guard_values=True, soft_cap=30.0,
                                                 bounded_logits=True, sinks=True),
    # part of the bounded logits' exp2 on the FMA pipe (MosaicSpec.poly_exp2, mosaic_exp2)
    "causal-softcap-poly-exp2": dict(band_lo=None, band_hi=0, soft_cap=30.0, bounded_logits=True, poly_exp2=2,
                                     poly_degree=2, forward_only=True),  # its backward: causal-softcap-bounded's
    "window-guarded-softcap-poly-exp2-d64": dict(band_lo=-200, band_hi=0, guard_values=True, soft_cap=30.0,
                                                 bounded_logits=True, poly_exp2=3, head_dim=64),
    # the same split in the backward's P (MosaicBwdSpec.poly_exp2; flushed below 2^-125)
    "causal-softcap-kvlen-bwd-poly-exp2": dict(band_lo=None, band_hi=0, soft_cap=30.0, kv_lengths=True,
                                               bwd_poly_exp2=2, bwd_poly_degree=2),
    "window-bwd-poly-exp2-d256": dict(band_lo=-200, band_hi=0, head_dim=256, block_kv=64, bwd_poly_exp2=3),
    # no lse output (MosaicSpec.lse: forward-only calls that do not return it)
    "causal-guarded-no-lse": dict(band_lo=None, band_hi=0, guard_values=True, lse=False, forward_only=True),
    # the softmax's fence (config mosaic_fence; `jaxattn tune` tries it on masked calls)
    "causal-guarded-fence": dict(band_lo=None, band_hi=0, guard_values=True, fence=True, forward_only=True),
    "window-no-lse": dict(band_lo=-200, band_hi=0, lse=False, forward_only=True),
    # the retry's vote on the whole tile, the store's wait after it (MosaicSpec.early_vote; untimed)
    "causal-guarded-early-vote": dict(band_lo=None, band_hi=0, guard_values=True, early_vote=True, forward_only=True),
}


class Unbatched:
    """A stand-in for `jax.custom_batching.custom_vmap` without its batching rule (monkeypatch it in):
    the fused backward's wrapper, which this jax cannot lower for CUDA around a mutable ref; it
    changes nothing inside the kernel (no shared memory, no instruction)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def def_vmap(self, rule):
        return rule


def mosaic_lowering(fields: Mapping[str, Any], fused_dq: str | None = None) -> tuple:
    """One `MOSAIC_LOWERINGS` entry as (forward, its arguments, backward, its arguments): jitted
    functions of the Mosaic kernels and shape structs (no data; batch 1, 512 tokens, 4 q / 2 kv heads),
    to lower for CUDA on any machine. The backward (the dq and dk/dv kernels, or `fused_dq`'s fused
    form) takes the forward's band, chunk, soft-cap, lengths and segment ids; (None, None) where its
    head dims have no Mosaic backward or the case says `forward_only` (its backward is another's)."""
    import jax.numpy as jnp

    from . import mosaic_bwd_kernels as mbk
    from . import mosaic_kernels as mk
    from .config import wide_backward
    from .gpu_path import MOSAIC_BWD_HEAD_DIMS

    fields = dict(fields)
    passes, cluster = fields.pop("passes", 1), fields.pop("dkv_cluster", 0)
    forward_only = fields.pop("forward_only", False)  # its backward is another case's: not lowered twice
    bwd_poly = {"poly_exp2": fields.pop("bwd_poly_exp2", 0), "poly_degree": fields.pop("bwd_poly_degree", 3)}
    d = fields.pop("head_dim", 128)
    d_v = fields.pop("value_head_dim", d)
    q = jax.ShapeDtypeStruct((1, 512, 4, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 512, 2, d), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((1, 512, 2, d_v), jnp.bfloat16)
    sinks = jax.ShapeDtypeStruct((4,), jnp.float32) if fields.get("sinks") else None
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    ids = jax.ShapeDtypeStruct((1, 512), jnp.int32)
    segments = (ids, ids) if fields.get("segments") else (None, None)
    spec = mk.MosaicSpec(scale=0.1, **fields)
    forward = jax.jit(lambda *a: mk.mosaic_forward(spec, *a))
    forward_args = (q, k, v, sinks, lengths if spec.q_lengths else None, lengths if spec.kv_lengths else None,
                    *segments)
    wide = wide_backward(d, d_v)
    if forward_only or not (wide or {d, d_v} <= set(MOSAIC_BWD_HEAD_DIMS)):
        return forward, forward_args, None, None
    bspec = mbk.MosaicBwdSpec(scale=0.1, band_lo=fields["band_lo"], band_hi=fields["band_hi"],
                              soft_cap=fields.get("soft_cap"), chunk=fields.get("chunk"),
                              kv_lengths=fields.get("kv_lengths", False), segments=spec.segments,
                              dq_block_kv=32 if wide else 64, passes=passes, cluster=cluster,
                              fused_dq=fused_dq, **bwd_poly)  # wide: mosaic_bwd_wide's dk/dv
    rows = jax.ShapeDtypeStruct((1, 4, 512), jnp.float32)
    backward_args = (q, k, v, jax.ShapeDtypeStruct((1, 512, 4, d_v), jnp.bfloat16), rows, rows,
                     lengths if bspec.kv_lengths else None, *segments)
    return forward, forward_args, jax.jit(lambda *a: mbk.mosaic_backward(bspec, *a)), backward_args
