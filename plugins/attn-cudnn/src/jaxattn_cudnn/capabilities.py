"""What cuDNN fused attention can do on a given machine, as reasons for a "no".

Read from `jaxattn.Hardware` (compute capability, cuDNN version) and from the request's
shapes and features. The numbers are those JAX's own cuDNN path checks
(`jax._src.cudnn.fused_attention_stablehlo.check_is_flash_attention`) plus cuDNN's
release notes for the features JAX does not check itself:

* fused flash attention: compute capability >= 8.0 and cuDNN >= 8.9.4;
* head_dim (and value head_dim) a multiple of 8, at most 128 before Hopper, 256 from 9.0;
* value head_dim != head_dim ("MLA"): cuDNN >= 9.10 and compute capability >= 9.0;
* sliding window: cuDNN >= 9.2;
* compute capability 10.3: cuDNN >= 9.11;
* bias in training: even q_len and kv_len;
* float16 / bfloat16 only.

Versions are cuDNN's integers: 8.9.4 -> 8904, 9.2.0 -> 90200 (cuDNN 9 uses
major*10000 + minor*100 + patch, cuDNN 8 major*1000 + minor*100 + patch).
"""

from __future__ import annotations

from dataclasses import replace

from jaxattn import FEATURES, AttentionRequest, Capabilities, Hardware

from . import _compat
from .translate import Untranslatable, plan_band

MIN_COMPUTE_CAPABILITY = (8, 0)
MIN_CUDNN = 8904
MIN_CUDNN_SLIDING_WINDOW = 90200
MIN_CUDNN_MLA = 91000
MIN_CUDNN_CC_10_3 = 91100
DTYPES = ("bfloat16", "float16")


def version_str(version: int) -> str:
    """cuDNN's integer version as text: 90800 -> "9.8.0", 8904 -> "8.9.4"."""
    if version >= 10000:
        return f"{version // 10000}.{version // 100 % 100}.{version % 100}"
    return f"{version // 1000}.{version // 100 % 10}.{version % 100}"


def hardware_reasons(hardware: Hardware) -> list[str]:
    """Why cuDNN fused attention cannot run on this machine at all (empty: it can)."""
    if not hardware.is_cuda:
        where = hardware.platform if hardware.platform != "gpu" else f"a {hardware.gpu_vendor or 'non-NVIDIA'} GPU"
        return [f"cudnn needs an NVIDIA GPU with CUDA; this machine is {where}"]
    reasons = []
    cc = hardware.compute_capability
    if cc is None:
        reasons.append("the GPU's compute capability is unknown (cuDNN flash attention needs >= 8.0)")
    elif tuple(cc) < MIN_COMPUTE_CAPABILITY:
        reasons.append(f"cuDNN flash attention needs compute capability >= 8.0 (Ampere); "
                       f"this GPU ({hardware.device_kind}) has {cc[0]}.{cc[1]}")
    version = hardware.cudnn_version
    if version is None:
        reasons.append("no cuDNN library was found (JAX reports no cuDNN version)")
    elif version < MIN_CUDNN:
        reasons.append(f"cuDNN {version_str(version)} has no fused flash attention (needs >= {version_str(MIN_CUDNN)})")
    elif cc is not None and tuple(cc) == (10, 3) and version < MIN_CUDNN_CC_10_3:
        reasons.append(f"compute capability 10.3 needs cuDNN >= {version_str(MIN_CUDNN_CC_10_3)}, "
                       f"found {version_str(version)}")
    return reasons


def _head_dim_limit(hardware: Hardware) -> int:
    cc = hardware.compute_capability or (0, 0)
    return 256 if tuple(cc) >= (9, 0) else 128


CAPABILITIES = Capabilities(
    dtypes=("float16", "bfloat16"), same_dtype=True,
    mask_kinds=frozenset({"full", "causal", "sliding_window", "segment", "dense"}),
    features=frozenset(FEATURES) - {"soft_cap", "sinks", "dropout"},
    notes={
        "soft_cap": "not in cuDNN fused attention as JAX exposes it",
        "sinks": "not in cuDNN fused attention as JAX exposes it",
        "dropout": "cuDNN's dropout, as JAX exposes it, takes a seed fixed at compile time, so it cannot "
                   "follow dropout_rng: every step would reuse one mask",
        "chunked_causal": "cuDNN has no chunked-causal mask",
        "query_positions": "cuDNN's causal mask has one offset per call",
    },
)
"""What the `cudnn` backend declares; `request_reasons` adds the rules that depend on the
hardware and on the exact band."""

EMULATED = replace(CAPABILITIES, dtypes=None, same_dtype=False)
"""`CudnnAttention(emulate=True)`: the same, any float dtype (tests run it in float32)."""


def request_reasons(request: AttentionRequest, hardware: Hardware,
                    alignment: str = _compat.CAUSAL_ALIGNMENT) -> list[str]:
    """Why this request cannot go to cuDNN on `hardware` beyond the declared `CAPABILITIES`
    (head dims on this GPU, versions, the band, training with a bias)."""
    r = request
    reasons: list[str] = []
    cc = tuple(hardware.compute_capability or (0, 0))
    version = hardware.cudnn_version
    limit = _head_dim_limit(hardware)
    for name, dim in (("head_dim", r.head_dim), ("value head_dim", r.value_head_dim)):
        if dim % 8 or dim > limit:
            reasons.append(f"cuDNN needs {name} a multiple of 8 and at most {limit} on compute capability "
                           f"{cc[0]}.{cc[1]}, got {dim}")
    if r.value_head_dim != r.head_dim:
        if cc < (9, 0) or (version is not None and version < MIN_CUDNN_MLA):
            reasons.append(f"value head_dim != head_dim needs cuDNN >= {version_str(MIN_CUDNN_MLA)} and "
                           "compute capability >= 9.0")
    if r.return_lse and r.needs_grad:
        reasons.append("JAX's cuDNN backward pass ignores the cotangent of the softmax statistics, so "
                       "gradients through the returned lse would be wrong (return_lse is forward-only)")
    kinds = r.mask_kinds
    bias_path = r.has_bias or "dense" in kinds or "segment" in kinds
    if r.band is not None:
        # The request carries the exact band: plan it as translate() will, and say why not.
        try:
            plan = plan_band(*r.band, r.q_len, r.kv_len, bias_available=bias_path, alignment=alignment)
        except Untranslatable as err:
            reasons.append(str(err))
        else:
            if plan.window is not None and version is not None and version < MIN_CUDNN_SLIDING_WINDOW:
                reasons.append(f"cuDNN's sliding window needs cuDNN >= {version_str(MIN_CUDNN_SLIDING_WINDOW)}, "
                               f"found {version_str(version)}")
    if bias_path and r.needs_grad and (r.q_len % 2 or r.kv_len % 2):
        reasons.append(f"cuDNN's backward pass with a bias or mask needs even q_len and kv_len, got "
                       f"{r.q_len} and {r.kv_len}")
    return reasons
