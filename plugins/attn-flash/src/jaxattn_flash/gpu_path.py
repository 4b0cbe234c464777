"""Which GPU kernels a call takes (Triton or, on Hopper, Mosaic GPU), forward and backward, and why.

`choose` (forward) and `choose_backward` are the one place each decision is made; the
backend calls them for every GPU call and tests call them with injected hardware. The
config key `gpu_kernel` (`metadata.operation_configs["flash"]`) says:

* "auto" (default): the Mosaic GPU forward on compute capability 9.x when the request is
  one it serves (`mosaic_reasons` is empty), Mosaic GPU imports, and the measured rule
  `AUTO_MOSAIC` says it is the faster kernel for that head_dim and mask; else Triton;
* "triton": always the Triton kernels;
* "mosaic": the Mosaic GPU forward, or a ValueError with every reason it cannot serve
  the call (never a silent fallback).

The key `gpu_backward` says the same of the backward kernels ("auto" follows the measured
rule `AUTO_MOSAIC_BWD`); either forward hands either backward the same lse, so the two
choices are independent. Both Mosaic paths serve soft-cap and sinks (the backward gets the
sinks through the lse, `mosaic_bwd_kernels.py`), sequence lengths and segment ids.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp

from jaxattn import AttentionRequest, Hardware, value_guard
from jaxattn.pallas_compat import SMEM_PER_BLOCK

from . import _compat
from . import config as _config
from .triton_kernels import KernelSpec
from .triton_vjp import Residuals, _flash_bwd

MOSAIC_DTYPES = ("bfloat16", "float16")
MOSAIC_HEAD_DIMS = (64, 128, 192, 256)  # of queries/keys and of values, each (192/128: MLA)
MOSAIC_BWD_HEAD_DIMS = (64, 128)  # each; pairs summing past 256 from MOSAIC_HEAD_DIMS (`_wide_reasons`)
MOSAIC_MASKS = frozenset({"full", "causal", "sliding_window", "chunked_causal", "segment"})
MIN_CHUNK = 64  # a kernel tile's 64 queries may straddle one chunk boundary, not two
ROWS = 128  # query rows per CUDA block of the Mosaic kernel (2 warpgroups x 64)

# The measured rule of "auto" on Hopper: (head_dim, "full" | "band") -> Mosaic is faster.
# Measured 2026-11-23 on an H100 (BENCHMARKS.md, bench/results/bench_mosaic_final.log), forward
# TFLOP/s Mosaic vs Triton: head_dim 128 full 588-613 vs 444-499, causal 533-632 vs 405-463,
# causal + window 1024 at 16k 0.295 vs 0.436 ms; head_dim 64 full 387 vs 332, causal 325 vs
# 259; head_dim 256 at (2, 4096, 16, 16) full 651 vs 230, causal 559 vs 203, GQA 16/4 causal
# 549 vs 217 (bench/results/tune_d256.log; Triton with its old 64x64 tiles; 128x64: 433/362/396).
# MLA's head dims (192 queries/keys, 128 values) at (2, 8192, 16, 16), 2026-11-30 on an H200:
# full 573 vs 319, causal 530 vs 284 (bench/results/h200_2026-11-30/mosaic_mla.log).
AUTO_MOSAIC: dict[tuple[int, str], bool] = {
    (64, "full"): True, (64, "band"): True,
    (128, "full"): True, (128, "band"): True,
    (192, "full"): True, (192, "band"): True,
    (256, "full"): True, (256, "band"): True,
}
# The measured rule of the backward: (head_dim, "full" | "band") -> the Mosaic GPU backward is faster.
# Measured 2026-11-30 on an H200 (BENCHMARKS.md "Mosaic GPU backward"), fwd+bwd TFLOP/s Mosaic vs
# Triton backward: head_dim 128 full 467-498 vs 393-413, causal 413-486 vs 349-379; at
# (1, 32768, 32/8) soft-cap 370 vs 272, sinks 469 vs 373, window 4096 457 vs 377; head_dim 64
# (8, 2048, 16, 16) full 325 vs 275, causal 254 vs 230; head_dim 256 (`mosaic_bwd_wide.py`) at
# (2, 4096, 16, 16 | 4) full 397-398 vs 271-274, causal 323-338 vs 246-249
# (bench/results/h200_2026-11-30/mosaic_bwd_wide.log); MLA (192 / 128 values) at (2, 8192, 16, 16)
# full 382 vs 212, causal 353 vs 202 (bench/results/h200_2026-11-30/mosaic_bwd_mla.log); 256 / 128
# values at (2, 4096, 16, 16) full 385 vs 231, causal 323 vs 205 (mosaic_bwd_mla256.log).
AUTO_MOSAIC_BWD: dict[tuple[int, str], bool] = {
    (64, "full"): True, (64, "band"): True,
    (128, "full"): True, (128, "band"): True,
    (192, "full"): True, (192, "band"): True,
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


def _hopper_reasons(request: AttentionRequest, hardware: Hardware, what: str) -> list[str]:
    """What both Mosaic GPU paths need: Hopper, bf16/fp16, grouped heads, dense attention, the import."""
    reasons = []
    cc = hardware.compute_capability
    if not hardware.is_cuda:
        reasons.append(f"the Mosaic GPU {what} needs an NVIDIA GPU")
    elif not hardware.is_hopper:
        have = "unknown" if cc is None else f"{cc[0]}.{cc[1]}"
        reasons.append(f"the Mosaic GPU {what} uses Hopper's wgmma (compute capability 9.x); this GPU has {have}")
    if request.dtype not in MOSAIC_DTYPES or request.kv_dtype != request.dtype:
        reasons.append(f"the Mosaic GPU {what} takes bfloat16 or float16 (q and k/v alike), "
                       f"not {request.dtype}/{request.kv_dtype}")
    if request.num_q_heads % request.num_kv_heads:
        reasons.append("query heads must be a multiple of key/value heads")
    if request.paged is not None:
        reasons.append(f"the Mosaic GPU {what} is for dense attention")
    other = request.mask_kinds - MOSAIC_MASKS
    if other:
        reasons.append(f"the Mosaic GPU {what} applies full, causal, sliding-window, chunked causal and segment "
                       f"masks only (not {', '.join(sorted(other))})")
    if request.chunk is not None and request.chunk[0] < MIN_CHUNK:
        reasons.append(f"the Mosaic GPU {what} takes chunks of at least {MIN_CHUNK} positions "
                       f"(got {request.chunk[0]})")
    error = _compat.mosaic_import_error()
    if error is not None:
        reasons.append(error)
    return reasons


def _unpadded_reasons(request: AttentionRequest, config: Mapping[str, Any], rows: int, keys: int,
                      what: str) -> list[str]:
    """The Mosaic kernels take no padding: lengths multiples of their tiles and of the Triton ones."""
    if request.q_len % rows or request.kv_len % keys:
        return [f"the Mosaic GPU {what} needs q_len a multiple of {rows} and kv_len a multiple of {keys} "
                f"(got {request.q_len}, {request.kv_len})"]
    d = max(request.head_dim, request.value_head_dim)
    q_mult, kv_mult = _config.pad_multiples(_config.resolve(config, d, request.q_len, request.kv_len))
    if request.q_len % q_mult or request.kv_len % kv_mult:
        return [f"the Triton kernels' tiles ({q_mult}, {kv_mult}) would pad this call "
                f"({request.q_len}, {request.kv_len})"]
    return []


# what neither Mosaic kernel applies: (request flag, what it is)
_UNSERVED = (("has_bias", "bias"), ("dropout", "dropout"))


def _head_dim_reasons(request: AttentionRequest, head_dims: tuple[int, ...], what: str) -> list[str]:
    d, dv = request.head_dim, request.value_head_dim
    if d in head_dims and dv in head_dims:
        return []
    dims = "/".join(map(str, head_dims))
    return [f"the Mosaic GPU {what} takes head_dim {dims} and value head_dim {dims} (got {d}/{dv})"]


def _unserved_reasons(request: AttentionRequest, what: str) -> list[str]:
    return [f"the Mosaic GPU {what} has no {name}" for flag, name in _UNSERVED if getattr(request, flag)]


def mosaic_reasons(request: AttentionRequest, hardware: Hardware, config: Mapping[str, Any]) -> list[str]:
    """Every reason the Mosaic GPU forward cannot serve `request` on `hardware` (empty: it can)."""
    what = "kernel"
    reasons = _hopper_reasons(request, hardware, what)
    dim_reasons = _head_dim_reasons(request, MOSAIC_HEAD_DIMS, what)
    if dim_reasons:
        reasons += dim_reasons
    else:
        d, dv = request.head_dim, request.value_head_dim
        bk, stages = _config.mosaic_tiles(config, d, dv, request.kv_len, banded=band_of(request) != (None, None))
        if _config.mosaic_smem_bytes(d, bk, stages, value_head_dim=dv, segments=request.has_segments) > SMEM_PER_BLOCK:
            reasons.append(f"mosaic_block_kv={bk} with {stages} stages does not fit in shared memory at "
                           f"{_config.dims_text(d, dv)}")
        reasons += _unpadded_reasons(request, config, ROWS, bk, what)
    return reasons + _unserved_reasons(request, what)


def mosaic_backward_reasons(request: AttentionRequest, hardware: Hardware, config: Mapping[str, Any]) -> list[str]:
    """Every reason the Mosaic GPU backward cannot serve `request` on `hardware` (empty: it can).
    It takes soft-cap and sinks (they enter through the lse), whichever forward ran."""
    what = "backward"
    reasons = _hopper_reasons(request, hardware, what)
    d, dv = request.head_dim, request.value_head_dim
    wide = _config.wide_backward(d, dv)
    dim_reasons = _wide_reasons(request, config) if wide else _head_dim_reasons(request, MOSAIC_BWD_HEAD_DIMS, what)
    if dim_reasons:
        reasons += dim_reasons
    else:
        block_kv_dq, _ = _config.mosaic_bwd_tiles(config, d, dv)
        reasons += [] if wide else _smem_reasons(request, config)
        reasons += _unpadded_reasons(request, config, ROWS, max(ROWS, block_kv_dq), what)
    return reasons + _unserved_reasons(request, what)


def _smem_reasons(request: AttentionRequest, config: Mapping[str, Any]) -> list[str]:
    """Whether the backward's kernels at head dims 64/128 fit in shared memory with the config's
    stages, dq key tile and dq form (at head_dim 128, 3 stages with "split" dQ and segment ids do
    not, nor "own" dQ with segment ids or 3 stages): said here, not by Mosaic GPU's compiler."""
    from .mosaic_bwd_dq import dq_smem_bytes
    from .mosaic_bwd_kernels import dkdv_smem_bytes

    d, dv = request.head_dim, request.value_head_dim
    block_kv_dq, stages = _config.mosaic_bwd_tiles(config, d, dv)
    try:
        fused = _config.mosaic_fused_dq(config, d, dv, bounded=_config.request_bounds_keys(request))
    except ValueError as err:
        return [str(err)]
    need = {"dk/dv kernel": dkdv_smem_bytes(d, dv, stages, fused, request.has_segments)}
    if not fused:
        need["dq kernel"] = dq_smem_bytes(d, dv, block_kv_dq, stages, request.has_segments)
    settings = (f"mosaic_stages_bwd={stages}, mosaic_dq={fused or 'separate'!r}"
                + ("" if fused else f", mosaic_block_kv_dq={block_kv_dq}")
                + (", segment ids" if request.has_segments else ""))
    return [f"the Mosaic GPU backward's {kernel} needs {size} bytes of shared memory with {settings} at "
            f"{_config.dims_text(d, dv)}, more than {SMEM_PER_BLOCK}" for kernel, size in need.items()
            if size > SMEM_PER_BLOCK]


def _wide_reasons(request: AttentionRequest, config: Mapping[str, Any]) -> list[str]:
    """What the backward at wide head dims (`mosaic_bwd_wide.py`, the dq kernel's 32-key tiles) needs."""
    from .mosaic_bwd_dq import dq_smem_bytes
    from .mosaic_bwd_wide import wide_smem_bytes

    d, dv = request.head_dim, request.value_head_dim
    if d not in MOSAIC_HEAD_DIMS or dv not in MOSAIC_HEAD_DIMS:
        return [f"the Mosaic GPU backward takes head_dim and value head_dim each of "
                f"{'/'.join(map(str, MOSAIC_HEAD_DIMS))} when they sum past 256 (got {d}/{dv})"]
    try:  # the config's dq settings must be ones these head dims take
        block_kv_dq, stages = _config.mosaic_bwd_tiles(config, d, dv)
        _config.mosaic_fused_dq(config, d, dv)
    except ValueError as err:
        return [str(err)]
    dq_bytes = dq_smem_bytes(d, dv, block_kv_dq, stages, request.has_segments)
    dkdv_bytes = wide_smem_bytes(d, dv, 64, stages, segments=request.has_segments)
    if max(dq_bytes, dkdv_bytes) > SMEM_PER_BLOCK:
        return [f"mosaic_stages_bwd={stages} does not fit in shared memory at {_config.dims_text(d, dv)}"]
    return []


def _decide(request: AttentionRequest, hardware: Hardware, *, key: str, wanted: str, interpret: bool,
            reasons: Callable[[], list[str]], rule: Mapping[tuple[int, str], bool], rule_name: str,
            what: str) -> PathChoice:
    """One choice between Triton and Mosaic GPU: the config key `key` says `wanted`; `reasons`
    lists why Mosaic cannot serve the call; `rule` says where it was measured faster."""
    if wanted == "triton":
        return PathChoice("triton", f"{key}='triton' in the flash config")
    if interpret:
        if wanted == "mosaic":
            raise ValueError(f"flash: {key}='mosaic' cannot run in the Pallas interpreter "
                             "(Mosaic GPU kernels compile for Hopper only)")
        return PathChoice("triton", "interpreter: only the Triton kernels run in it")
    found = reasons()
    if wanted == "mosaic":
        if found:
            raise ValueError(f"flash: {key}='mosaic' cannot serve this call: " + "; ".join(found))
        return PathChoice("mosaic", f"{key}='mosaic' in the flash config")
    if found:
        return PathChoice("triton", "auto: " + "; ".join(found))
    lo, hi = band_of(request)
    rule_key = (request.head_dim, "full" if lo is None and hi is None else "band")
    if rule_key not in rule:
        return PathChoice("triton", f"auto: the Mosaic GPU {what} was not measured at head_dim {rule_key[0]}, "
                                    f"{rule_key[1]} mask ({rule_name}); force it with {key}='mosaic'")
    if not rule[rule_key]:
        return PathChoice("triton", f"auto: Triton measured faster than the Mosaic GPU {what} at head_dim "
                                    f"{rule_key[0]}, {rule_key[1]} mask ({rule_name})")
    cc = hardware.compute_capability
    return PathChoice("mosaic", f"auto: Hopper (compute capability {cc[0]}.{cc[1]}) and a call the Mosaic GPU "
                                f"{what} serves")


def choose(request: AttentionRequest, hardware: Hardware, config: Mapping[str, Any] | None = None,
           *, interpret: bool = False) -> PathChoice:
    """The forward kernel `request` takes on `hardware` under `config` (the "flash" config dict)."""
    config = config or {}
    return _decide(request, hardware, key="gpu_kernel", wanted=_config.gpu_kernel(config), interpret=interpret,
                   reasons=lambda: mosaic_reasons(request, hardware, config), rule=AUTO_MOSAIC,
                   rule_name="AUTO_MOSAIC", what="kernel")


def choose_backward(request: AttentionRequest, hardware: Hardware, config: Mapping[str, Any] | None = None,
                    *, interpret: bool = False) -> PathChoice:
    """The backward kernels `request` takes on `hardware` under `config` (key `gpu_backward`); a
    Mosaic choice also says how it makes dq (whether the gradients are bitwise deterministic)."""
    config = config or {}
    choice = _decide(request, hardware, key="gpu_backward", wanted=_config.gpu_backward(config),
                     interpret=interpret, reasons=lambda: mosaic_backward_reasons(request, hardware, config),
                     rule=AUTO_MOSAIC_BWD, rule_name="AUTO_MOSAIC_BWD", what="backward")
    if choice.kernel != "mosaic":
        return choice
    return PathChoice("mosaic", f"{choice.reason}; {_dq_text(request, config)}")


def _dq_text(request: AttentionRequest, config: Mapping[str, Any]) -> str:
    """How the Mosaic backward makes dq for `request` (a call `mosaic_backward_reasons` accepts), and why."""
    d, dv = request.head_dim, request.value_head_dim
    if _config.wide_backward(d, dv):
        return f"dq: the separate kernel ({_config.WIDE_DQ_BLOCK_KV}-key tiles at wide head dims; deterministic)"
    bounded = _config.request_bounds_keys(request)
    fused = _config.mosaic_fused_dq(config, d, dv, bounded=bounded)
    _, why = _config.mosaic_dq_choice(config, d, bounded)
    form = ("the separate kernel (deterministic)" if fused is None
            else f"fused {fused!r} into the dk/dv kernel (TMA reductions: not bitwise deterministic)")
    return f"dq: {form}, by {why}"


# -- the Mosaic forward under custom_vjp, with the Triton backward --------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def flash_mosaic(spec: KernelSpec, mspec: Any, q, k, v, sinks, q_lens, kv_lens, q_seg, kv_seg, bad):
    """(out, lse) of unpadded q/k/v (and sinks or None) through the Mosaic forward; gradients
    through `_flash_bwd`. Where a mask can hide a key, `mspec.guard_values` has the kernel keep
    non-finite values of masked keys from the rows that do not see them (and make the rows
    that see one NaN), and `bad` (bool `[B, Skv, Hkv]`, `value_guard.bad_keys`; None: nothing
    to guard) names those keys for the backward, whose dv is zero there. The forward reads
    no value twice: `bad` is computed only where the call is differentiated, and there the
    kernel's guard flags come from it (`guard_form` "flags"; "retry" reads none). `q_lens`/`kv_lens`
    (int32 `[B]` or None) are the sequence lengths, `q_seg`/`kv_seg` (int32 `[B, S]` or None)
    the segment ids. With `mspec.lse` False a call that is not differentiated stores no lse and
    gives zeros in its place (the caller asked for none); a differentiated one makes it."""
    from .mosaic_kernels import mosaic_forward

    out, lse = mosaic_forward(mspec, q, k, v, sinks, q_lens, kv_lens, q_seg, kv_seg)
    if lse is None:  # the same tree as `_fwd`'s primal output
        lse = jnp.zeros((q.shape[0], q.shape[2], q.shape[1]), jnp.float32)
    return out, lse


def _fwd(spec, mspec, q, k, v, sinks, q_lens, kv_lens, q_seg, kv_seg, bad):
    from .mosaic_kernels import mosaic_forward

    out, lse = mosaic_forward(replace(mspec, lse=True), q, k, v, sinks, q_lens, kv_lens, q_seg, kv_seg,
                              bad_keys=bad)
    # v as given: `_flash_bwd` zeroes its non-finite entries itself (`finite_values`); the rows
    # that see one are NaN in `out`, and the backward treats them as the Triton forward's own
    residuals = Residuals(q=q, k=k, v=v, out=out, lse=lse, sinks=sinks, q_seg=q_seg, kv_seg=kv_seg, q_lens=q_lens,
                          kv_lens=kv_lens)
    return (out, lse), (residuals, bad)


def _bwd(spec, mspec, residuals, cotangents):
    residuals, bad = residuals
    dq, dk, dv, d_sinks, *_ = _flash_bwd(spec, residuals, cotangents)
    if bad is not None:  # the values the kernel zeroed: no gradient reaches them
        dv = value_guard.clean(dv, bad)
    return dq, dk, dv, d_sinks, None, None, None, None, None


flash_mosaic.defvjp(_fwd, _bwd)
