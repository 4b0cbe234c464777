"""Which GPU forward kernel a call takes (Triton or, on Hopper, Mosaic GPU), and why.

`choose(request, hardware, config)` is the one place that decides; the backend calls it
for every GPU call and tests call it with injected hardware. The config key `gpu_kernel`
(`metadata.operation_configs["flash"]`) says:

* "auto" (default): the Mosaic GPU forward on compute capability 9.x when the request is
  one it serves (`mosaic_reasons` is empty), Mosaic GPU imports, and the measured rule
  `AUTO_MOSAIC` says it is the faster kernel for that head_dim and mask; else Triton;
* "triton": always the Triton kernels;
* "mosaic": the Mosaic GPU forward, or a ValueError with every reason it cannot serve
  the call (never a silent fallback).

The backward pass is always the Triton dq and dk/dv kernels: the Mosaic forward hands
them the same lse as the Triton forward (`flash_mosaic` is the custom_vjp).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax

from jaxattn import AttentionRequest, Hardware, value_guard

from . import _compat
from . import config as _config
from .triton_kernels import KernelSpec
from .triton_vjp import Residuals, _flash_bwd

MOSAIC_DTYPES = ("bfloat16", "float16")
MOSAIC_HEAD_DIMS = (64, 128, 256)
MOSAIC_MASKS = frozenset({"full", "causal", "sliding_window"})
ROWS = 128  # query rows per CUDA block of the Mosaic kernel (2 warpgroups x 64)

# The measured rule of "auto" on Hopper: (head_dim, "full" | "band") -> Mosaic is faster.
# Measured 2026-11-23 on an H100 (BENCHMARKS.md, bench/results/bench_mosaic_final.log), forward
# TFLOP/s Mosaic vs Triton: head_dim 128 full 588-613 vs 444-499, causal 533-632 vs 405-463,
# causal + window 1024 at 16k 0.295 vs 0.436 ms; head_dim 64 full 387 vs 332, causal 325 vs
# 259; head_dim 256 at (2, 4096, 16, 16) full 651 vs 230, causal 559 vs 203, GQA 16/4 causal
# 549 vs 217 (bench/results/tune_d256.log; Triton with its old 64x64 tiles; 128x64: 433/362/396).
AUTO_MOSAIC: dict[tuple[int, str], bool] = {
    (64, "full"): True, (64, "band"): True,
    (128, "full"): True, (128, "band"): True,
    (256, "full"): True, (256, "band"): True,
}


@dataclass(frozen=True)
class PathChoice:
    """The forward kernel of one GPU call: `kernel` is "mosaic" or "triton"; `reason` says why."""

    kernel: str
    reason: str

    def __str__(self) -> str:
        return f"{self.kernel}: {self.reason}"


def band_of(request: AttentionRequest) -> tuple[int | None, int | None]:
    """The static band of the request's mask; bottom-right causal when only the kind is known."""
    if request.band is not None:
        return request.band
    if "causal" in request.mask_kinds:
        return None, request.kv_len - request.q_len
    return None, None


def mosaic_reasons(request: AttentionRequest, hardware: Hardware, config: Mapping[str, Any]) -> list[str]:
    """Every reason the Mosaic GPU forward cannot serve `request` on `hardware` (empty: it can)."""
    reasons = []
    cc = hardware.compute_capability
    if not hardware.is_cuda:
        reasons.append("the Mosaic GPU kernel needs an NVIDIA GPU")
    elif cc is None or cc[0] != 9:
        have = "unknown" if cc is None else f"{cc[0]}.{cc[1]}"
        reasons.append(f"the Mosaic GPU kernel uses Hopper's wgmma (compute capability 9.x); this GPU has {have}")
    if request.dtype not in MOSAIC_DTYPES or request.kv_dtype != request.dtype:
        reasons.append(f"the Mosaic GPU kernel takes bfloat16 or float16 (q and k/v alike), "
                       f"not {request.dtype}/{request.kv_dtype}")
    d, dv = request.head_dim, request.value_head_dim
    if d != dv or d not in MOSAIC_HEAD_DIMS:
        reasons.append(f"the Mosaic GPU kernel takes head_dim {'/'.join(map(str, MOSAIC_HEAD_DIMS))} with equal "
                       f"value head_dim (got {d}/{dv})")
    else:
        bk, stages = _config.mosaic_tiles(config, d)
        if _config.mosaic_smem_bytes(d, bk, stages) > _config.MOSAIC_SMEM_BYTES:
            reasons.append(f"mosaic_block_kv={bk} with {stages} stages does not fit in shared memory at head_dim {d}")
        if request.q_len % ROWS or request.kv_len % bk:
            reasons.append(f"the Mosaic GPU kernel needs q_len a multiple of {ROWS} and kv_len a multiple of "
                           f"{bk} (got {request.q_len}, {request.kv_len})")
        else:
            q_mult, kv_mult = _config.pad_multiples(_config.resolve(config, d, request.q_len, request.kv_len))
            if request.q_len % q_mult or request.kv_len % kv_mult:
                reasons.append(f"the Triton backward's tiles ({q_mult}, {kv_mult}) would pad this call "
                               f"({request.q_len}, {request.kv_len})")
    if request.num_q_heads % request.num_kv_heads:
        reasons.append("query heads must be a multiple of key/value heads")
    other = request.mask_kinds - MOSAIC_MASKS
    if other:
        reasons.append(f"the Mosaic GPU kernel applies full, causal and sliding-window masks only "
                       f"(not {', '.join(sorted(other))})")
    for flag, what in (("logits_soft_cap", "logits soft-cap"), ("has_sinks", "sinks"),
                       ("q_seq_lengths", "query sequence lengths"), ("kv_seq_lengths", "key/value sequence lengths"),
                       ("has_bias", "a bias"), ("dropout", "dropout")):
        if getattr(request, flag):
            reasons.append(f"the Mosaic GPU kernel has no {what}")
    if request.paged is not None:
        reasons.append("the Mosaic GPU kernel is for dense attention")
    error = _compat.mosaic_import_error()
    if error is not None:
        reasons.append(error)
    return reasons


def choose(request: AttentionRequest, hardware: Hardware, config: Mapping[str, Any] | None = None,
           *, interpret: bool = False) -> PathChoice:
    """The forward kernel `request` takes on `hardware` under `config` (the "flash" config dict)."""
    config = config or {}
    wanted = _config.gpu_kernel(config)
    if wanted == "triton":
        return PathChoice("triton", "gpu_kernel='triton' in the flash config")
    if interpret:
        if wanted == "mosaic":
            raise ValueError("flash: gpu_kernel='mosaic' cannot run in the Pallas interpreter "
                             "(Mosaic GPU kernels compile for Hopper only)")
        return PathChoice("triton", "interpreter: only the Triton kernels run in it")
    reasons = mosaic_reasons(request, hardware, config)
    if wanted == "mosaic":
        if reasons:
            raise ValueError("flash: gpu_kernel='mosaic' cannot serve this call: " + "; ".join(reasons))
        return PathChoice("mosaic", "gpu_kernel='mosaic' in the flash config")
    if reasons:
        return PathChoice("triton", "auto: " + "; ".join(reasons))
    lo, hi = band_of(request)
    key = (request.head_dim, "full" if lo is None and hi is None else "band")
    if not AUTO_MOSAIC.get(key, False):
        return PathChoice("triton", f"auto: Triton measured faster than Mosaic GPU at head_dim {key[0]}, "
                                    f"{key[1]} mask (AUTO_MOSAIC)")
    return PathChoice("mosaic", f"auto: Hopper (compute capability {hardware.compute_capability[0]}."
                                f"{hardware.compute_capability[1]}) and a call the Mosaic GPU kernel serves")


# -- the Mosaic forward under custom_vjp, with the Triton backward --------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def flash_mosaic(spec: KernelSpec, mspec: Any, q, k, v, poisoned):
    """(out, lse) of unpadded q/k/v through the Mosaic forward, with the rows of `poisoned`
    (bool `[B, Sq, Hq]`: they see a non-finite value, which `v` no longer holds) made NaN;
    gradients through the Triton kernels. The NaN rows are part of the residual output, so the
    backward treats them as it treats the Triton forward's own NaN rows."""
    return _mosaic_poisoned(mspec, q, k, v, poisoned)


def _mosaic_poisoned(mspec, q, k, v, poisoned):
    from .mosaic_kernels import mosaic_forward

    out, lse = mosaic_forward(mspec, q, k, v)
    return value_guard.poison(out, poisoned), lse


def _fwd(spec, mspec, q, k, v, poisoned):
    out, lse = _mosaic_poisoned(mspec, q, k, v, poisoned)
    return (out, lse), Residuals(q, k, v, out, lse)


def _bwd(spec, mspec, residuals, cotangents):
    dq, dk, dv, *_ = _flash_bwd(spec, residuals, cotangents)
    return dq, dk, dv, None


flash_mosaic.defvjp(_fwd, _bwd)
