"""`Capabilities`: what a backend can do, declared once.

A backend lists its limits as data (dtypes, head dims, mask kinds, optional features) in
its `capabilities` class attribute. The default `OperationImpl.supports()` checks a
request against them and gives the standard reason for every limit the request crosses,
then adds the backend's own `extra_reasons()` (hardware rules, page sizes...). The core
checks support before it calls a forward (`OperationImpl.__call__`), so forwards do not
repeat these checks: the list cannot drift from a second copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .request import AttentionRequest

FEATURES = ("bias", "dropout", "soft_cap", "sinks", "q_seq_lengths", "kv_seq_lengths", "return_lse",
            "backward", "value_head_dim")
"""The optional features of a call; a backend declares the ones it has."""

_FEATURE_TEXT = {
    "bias": "additive bias", "dropout": "dropout", "soft_cap": "logits soft-cap", "sinks": "attention sinks",
    "q_seq_lengths": "query sequence lengths", "kv_seq_lengths": "key/value sequence lengths",
    "return_lse": "lse output (return_lse)", "backward": "backward pass",
    "value_head_dim": "value head_dim different from head_dim",
}
_MASK_TEXT = {
    "full": "full masks", "causal": "causal masks", "sliding_window": "sliding windows",
    "chunked_causal": "chunked-causal masks", "segment": "segment ids", "dense": "dense boolean masks",
    "or": "masks combined with `|` (only `&`)", "query_positions": "a position per query (QueryPositionMask: "
    "KV-cache prefill)",
}


def _used(request: AttentionRequest) -> list[str]:
    """The optional features `request` uses."""
    flags = {
        "bias": request.has_bias, "dropout": request.dropout, "soft_cap": request.logits_soft_cap,
        "sinks": request.has_sinks, "q_seq_lengths": request.q_seq_lengths and request.paged is None,
        "kv_seq_lengths": request.kv_seq_lengths and request.paged is None, "return_lse": request.return_lse,
        "backward": request.needs_grad, "value_head_dim": request.value_head_dim != request.head_dim,
    }
    return [name for name in FEATURES if flags[name]]


def _either(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


@dataclass(frozen=True)
class Capabilities:
    """Declared limits of a backend (None: no limit).

    * `dtypes`: query dtypes it takes; `kv_dtypes`: key/value (or cache) dtypes, None
      meaning the same list; `same_dtype`: key/value must be in the query's dtype.
    * `max_head_dim`, `head_dim_multiple`: limits on head_dim and value head_dim.
    * `mask_kinds`: the mask kinds it applies (`AttentionRequest.mask_kinds`).
    * `features`: the optional features it has, of `FEATURES` (paged calls' own key
      lengths are not a feature).
    * `notes`: words added to the standard reason of a feature, mask kind or "dtype",
      e.g. `{"bias": "use cudnn or xla"}`.
    """

    dtypes: tuple[str, ...] | None = None
    kv_dtypes: tuple[str, ...] | None = None
    same_dtype: bool = False
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    mask_kinds: frozenset[str] | None = None
    features: frozenset[str] = frozenset(FEATURES)
    notes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"Capabilities.features: unknown features {sorted(unknown)}; known: {FEATURES}")

    def _note(self, key: str) -> str:
        note = self.notes.get(key)
        return f" ({note})" if note else ""

    def reasons(self, name: str, request: AttentionRequest) -> list[str]:
        """The standard reasons why a backend called `name` cannot serve `request`."""
        r, reasons = request, []
        if self.dtypes is not None and r.dtype not in self.dtypes:
            reasons.append(f"{name} takes {_either(self.dtypes)} inputs, not {r.dtype}{self._note('dtype')}")
        kv_dtypes = self.kv_dtypes if self.kv_dtypes is not None else self.dtypes
        if self.same_dtype and r.kv_dtype != r.dtype:
            reasons.append(f"{name} needs key/value in the query's dtype ({r.dtype}), got {r.kv_dtype}")
        elif kv_dtypes is not None and r.kv_dtype not in kv_dtypes and r.kv_dtype != r.dtype:
            reasons.append(f"{name} takes {_either(kv_dtypes)} key/value, not {r.kv_dtype}")
        if self.max_head_dim is not None and max(r.head_dim, r.value_head_dim) > self.max_head_dim:
            reasons.append(f"{name} supports head_dim up to {self.max_head_dim} "
                           f"(got {r.head_dim}/{r.value_head_dim})")
        for label, dim in (("head_dim", r.head_dim), ("value_head_dim", r.value_head_dim)):
            if dim % self.head_dim_multiple:
                reasons.append(f"{name} needs head dims that are multiples of {self.head_dim_multiple}, "
                               f"got {label}={dim}{self._note('head_dim')}")
        if self.mask_kinds is not None:
            for kind in sorted(r.mask_kinds - self.mask_kinds):
                reasons.append(f"{name} cannot apply {_MASK_TEXT.get(kind, repr(kind) + ' masks')}{self._note(kind)}")
        for feature in _used(r):
            if feature not in self.features:
                reasons.append(f"{name} has no {_FEATURE_TEXT[feature]}{self._note(feature)}")
        return reasons
