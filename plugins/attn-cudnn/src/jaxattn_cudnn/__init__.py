"""jaxattn-cudnn: cuDNN fused (flash) attention as a jaxattn backend named `cudnn`.

    import jaxattn
    out = jaxattn.attention(q, k, v, is_causal=True, backend="cudnn")

See README.md for what it supports and how jaxattn's masks are translated.
"""

from .backend import CudnnAttention
from .capabilities import hardware_reasons, request_reasons
from .translate import BandPlan, CudnnCall, Untranslatable, emulate_cudnn, finish, plan_band, translate

__all__ = [
    "BandPlan", "CudnnAttention", "CudnnCall", "Untranslatable", "emulate_cudnn", "finish",
    "hardware_reasons", "plan_band", "request_reasons", "translate",
]
__version__ = "0.1.0"
