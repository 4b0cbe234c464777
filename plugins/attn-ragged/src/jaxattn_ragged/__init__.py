"""jaxattn-ragged: paged-KV-cache attention backends for jaxattn.

Backends (op "paged_attention"): `ragged_paged` (decode and ragged prefill+decode in one
Pallas launch) and `decode` (its decode layout), for 16-bit and quantized (int8, fp8)
caches. Cache writer: `update_paged_kv_cache`, an alias of `jaxattn.update_paged_cache`.
"""

from .cache import token_slots, update_paged_kv_cache
from .kernel import DECODE_CONFIG, RAGGED_CONFIG, KernelConfig, paged_attention_kernel
from .plugin import DecodeAttention, DecodeConfig, RaggedConfig, RaggedPagedAttention
from .tpu import combine_kv_pages, tpu_paged_attention

__all__ = [
    "DECODE_CONFIG", "RAGGED_CONFIG", "DecodeAttention", "DecodeConfig", "KernelConfig", "RaggedConfig",
    "RaggedPagedAttention",
    "combine_kv_pages", "paged_attention_kernel", "token_slots", "tpu_paged_attention",
    "update_paged_kv_cache",
]
__version__ = "0.1.0"
