"""jaxattn: attention backends for JAX behind one API, chosen at run time with reasons.

    import jaxattn
    out = jaxattn.attention(q, k, v, is_causal=True)          # best installed backend
    print(jaxattn.explain(q, k, v, is_causal=True))           # which one, and why
    with jaxattn.use_backend("xla"): ...                      # force one

Backends are plugins found through the `jaxattn.backends` entry-point group; the
built-in `xla` backend runs everywhere and is the numerical reference. `jaxattn.compat`
is a drop-in for `jax.nn.dot_product_attention`; `jaxattn.flax` (needs flax, imported only
there) holds Flax's `attention_fn` and the `FlexibleAttention` modules. `auto` ranks
the usable backends by measurement where a tuning table covers the call (`jaxattn tune`,
`jaxattn.tuning`), else by declared priority. A paged KV cache is written with
`update_paged_cache`, and may be stored quantized (`quantize_kv`: int8 or float8_e4m3fn
with per token and head scales) for `paged_attention`'s `k_scale`/`v_scale`.
"""

from __future__ import annotations

from . import compat, hardware, tuning, value_guard
from ._version import __version__
from .api import CONTEXT_NAME, attention, explain, paged_attention, select, select_request
from .backend_config import BackendConfig
from .cache import KVCache, cached_attention
from .capabilities import FEATURES, Capabilities
from .hardware import Hardware
from .inputs import AttentionInputs, PagedAttentionInputs
from .listing import BackendInfo, broken_plugins, list_backends
from .masks import (
    EMPTY,
    FULL,
    PARTIAL,
    AndMask,
    CausalMask,
    ChunkedCausalMask,
    DenseMask,
    FullMask,
    Mask,
    MaskParts,
    OrMask,
    QueryPositionMask,
    SegmentMask,
    SlidingWindowMask,
    mask_parts,
)
from .mechanisms import AttentionMechanisms
from .merge import merge_attention
from .metadata import AttnShardingRules, OperationMetadata, PartitionAxis
from .operation import OperationImpl
from .paged_cache import update_paged_cache
from .parallel import load_balance, unload_balance
from .quant import dequantize_kv, quantize_kv
from .registry import BrokenPlugin, Registry, default_registry, hookimpl, hookspec
from .request import AttentionRequest, PagedLayout
from .selector import (
    NO_MEASUREMENTS,
    BackendFailedError,
    BackendUnavailableError,
    MeasuredRanking,
    NoBackendError,
    Rejection,
    Selection,
    TuningCache,
    set_tuning_cache,
    use_backend,
)
from .support import Support


def refresh_backends() -> None:
    """Discover installed backends again (after installing a plugin, or changing
    `JAXATTN_DISABLE_PLUGINS`, in a running process)."""
    default_registry().refresh()


__all__ = [
    "CONTEXT_NAME", "EMPTY", "FEATURES", "FULL", "NO_MEASUREMENTS", "PARTIAL",
    "AndMask", "AttentionInputs", "AttentionMechanisms", "AttentionRequest", "AttnShardingRules",
    "BackendConfig", "BackendFailedError", "BackendInfo", "BackendUnavailableError", "BrokenPlugin", "Capabilities",
    "CausalMask", "ChunkedCausalMask", "DenseMask", "FullMask", "Hardware", "KVCache", "Mask", "MaskParts",
    "MeasuredRanking", "NoBackendError", "OperationImpl",
    "OperationMetadata", "OrMask", "PagedAttentionInputs", "PagedLayout", "PartitionAxis",
    "QueryPositionMask", "Registry", "Rejection", "SegmentMask", "Selection", "SlidingWindowMask", "Support",
    "TuningCache", "__version__",
    "attention", "broken_plugins", "cached_attention", "compat", "default_registry", "dequantize_kv", "explain",
    "hardware", "hookimpl", "hookspec", "list_backends", "load_balance", "mask_parts", "merge_attention",
    "paged_attention", "quantize_kv", "refresh_backends", "select", "select_request", "set_tuning_cache", "tuning",
    "unload_balance", "update_paged_cache", "use_backend", "value_guard",
]
