"""jaxattn inside Flax models (`pip install 'jaxattn[flax]'`); the only place that imports flax.

* `attention_fn` / `make_attention_fn(...)`: the `attention_fn` of
  `flax.nnx.MultiHeadAttention` and `flax.linen.MultiHeadDotProductAttention`, with Flax's
  signature and mask, bias, dropout and `deterministic` conventions.
* `FlexibleAttention` (nnx) and `LinenFlexibleAttention` (linen): modules that hold the
  backend choice (a backend name or an EasyDeL `attention_mechanism`), `OperationMetadata`,
  dropout and default keywords, and attend over an optional `jaxattn.KVCache`.

`import jaxattn` never imports this package, so the core works without flax.
"""

from __future__ import annotations

try:
    import flax  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised by a test that hides flax
    raise ImportError("jaxattn.flax needs flax: pip install 'jaxattn[flax]'") from err

from .functional import attention_fn, make_attention_fn
from .modules import FlexibleAttention, LinenFlexibleAttention

__all__ = ["FlexibleAttention", "LinenFlexibleAttention", "attention_fn", "make_attention_fn"]
