"""From a jaxattn `Mask` to what the splash kernel takes: a lazy node, segment ids, and
(only as a last resort) a dense boolean mask.

`plan_mask` splits `mask.conjuncts()` three ways:

* structural masks (any `BandMask` such as `CausalMask(offset)`, `SlidingWindowMask`,
  `FullMask`; `ChunkedCausalMask` with any offset; and `&`/`|` of those) become one
  `lazy.Node`, computed inside the kernel: nothing of size q_len x kv_len is built;
* one `SegmentMask` becomes the kernel's own `SegmentIds` (with `key_value_seq_lengths`
  folded in);
* everything else (a `DenseMask` or bool array, a second `SegmentMask`, an `|` that
  involves segments or arrays, a third-party mask class) is materialized as a dense
  `[B|1, H|1, q, kv]` mask and fed to splash's dynamic-mask path, which stores every
  tile: the last resort, costing q_len x kv_len booleans per distinct batch/head mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxattn.masks import AndMask, BandMask, ChunkedCausalMask, Mask, OrMask, SegmentMask

from . import lazy


@dataclass
class MaskPlan:
    node: lazy.Node = field(default_factory=lazy.Full)
    segments: SegmentMask | None = None
    dense: list[Mask] = field(default_factory=list)

    @property
    def lazy_only(self) -> bool:
        return not self.dense


def to_node(mask: Mask, q_len: int, kv_len: int) -> lazy.Node | None:
    """The lazy node of a structural mask (None when `mask` holds arrays or is unknown)."""
    if isinstance(mask, BandMask):
        lo, hi = mask.bounds(q_len, kv_len)
        if lo is None and hi is None:
            return lazy.Full()
        return lazy.Band(None if lo is None else int(lo), None if hi is None else int(hi))
    if isinstance(mask, ChunkedCausalMask):
        return lazy.Chunk(mask.resolved_chunk(q_len, kv_len), int(mask.resolved_offset(q_len, kv_len)))
    if isinstance(mask, (AndMask, OrMask)):
        a, b = to_node(mask.a, q_len, kv_len), to_node(mask.b, q_len, kv_len)
        if a is None or b is None:
            return None
        return lazy.conjoin([a, b]) if isinstance(mask, AndMask) else lazy.disjoin([a, b])
    return None


def plan_mask(mask: Mask | None, q_len: int, kv_len: int) -> MaskPlan:
    plan = MaskPlan()
    if mask is None:
        return plan
    nodes: list[lazy.Node] = []
    for part in mask.conjuncts():
        node = to_node(part, q_len, kv_len)
        if node is not None:
            nodes.append(node)
        elif isinstance(part, SegmentMask) and plan.segments is None:
            plan.segments = part
        else:
            plan.dense.append(part)
    plan.node = lazy.conjoin(nodes) if nodes else lazy.Full()
    return plan


def needs_dense(mask: Mask | None, q_len: int = 256, kv_len: int = 256) -> bool:
    """Whether `mask` takes the dense last-resort path (for `explain` and docs)."""
    return bool(plan_mask(mask, q_len, kv_len).dense)
