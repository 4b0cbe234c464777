"""Running a backend under `shard_map` with the specs of `AttnShardingRules`.

The backend sees the local shard of every array (its batch and head slices) and needs no
knowledge of the mesh. Arrays inside mask objects are sharded like the arrays they
describe. Dropout keys are folded with the shard's position so shards do not repeat
one pattern.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from ._compat import shard_map
from .hardware import Hardware
from .inputs import AttentionInputs, PagedAttentionInputs
from .masks import AndMask, DenseMask, Mask, OrMask, QueryPositionMask, SegmentMask
from .metadata import AttnShardingRules, OperationMetadata
from .operation import Output
from .request import AttentionRequest


def _broadcast_spec(spec: P, shape: tuple[int, ...]) -> P:
    """Drop sharding on dimensions of size 1 (broadcast), and leading dims of lower ranks."""
    entries = tuple(spec) + (None,) * (4 - len(tuple(spec)))
    entries = entries[4 - len(shape):]
    return P(*(None if size == 1 else e for e, size in zip(entries, shape)))


def _mask_specs(mask: Mask | None, rules: AttnShardingRules) -> Any:
    if mask is None:
        return None
    if isinstance(mask, SegmentMask):
        return SegmentMask(rules.q_segment_ids, rules.kv_segment_ids)  # type: ignore[arg-type]
    if isinstance(mask, DenseMask):
        spec = _broadcast_spec(rules.mask, tuple(mask.array.shape))
        return DenseMask(spec)  # type: ignore[arg-type]
    if isinstance(mask, QueryPositionMask):
        return dataclasses.replace(mask, positions=rules.q_segment_ids)  # [batch, q_len], as query segment ids
    if isinstance(mask, (AndMask, OrMask)):
        return type(mask)(_mask_specs(mask.a, rules), _mask_specs(mask.b, rules))
    return mask  # structural masks hold no arrays


def attention_specs(inputs: AttentionInputs, rules: AttnShardingRules) -> AttentionInputs:
    def maybe(x: Any, spec: P) -> Any:
        return None if x is None else spec

    bias_spec = None if inputs.bias is None else _broadcast_spec(rules.bias, tuple(inputs.bias.shape))
    return dataclasses.replace(
        inputs,
        query=rules.query, key=rules.key, value=rules.value,
        bias=bias_spec,
        mask=_mask_specs(inputs.mask, rules),
        sinks=maybe(inputs.sinks, rules.softmax_aux),
        q_seq_lengths=maybe(inputs.q_seq_lengths, rules.seq_lengths),
        kv_seq_lengths=maybe(inputs.kv_seq_lengths, rules.seq_lengths),
        dropout_rng=maybe(inputs.dropout_rng, P()),
    )


def _paged_specs(inputs: PagedAttentionInputs, rules: AttnShardingRules) -> PagedAttentionInputs:
    return dataclasses.replace(
        inputs,
        query=rules.query, key_pages=rules.key, value_pages=rules.value,
        kv_lengths=P(), page_indices=P(),
        cu_q_lens=None if inputs.cu_q_lens is None else P(),
        sinks=None if inputs.sinks is None else rules.softmax_aux,
        k_scale=_scale_spec(inputs.k_scale, rules.key), v_scale=_scale_spec(inputs.v_scale, rules.value),
    )


def _scale_spec(scale: Any, pages: P) -> P | None:
    """Per token and head scales `[num_pages, page_size, kv_heads]` shard like their pages'
    first three dims; a scalar is replicated."""
    if scale is None:
        return None
    return P(*tuple(pages)[:3]) if scale.ndim else P()


def _fold_dropout(inputs: AttentionInputs, mesh: Any) -> AttentionInputs:
    if inputs.dropout_rng is None:
        return inputs
    index = jnp.int32(0)
    for name in mesh.axis_names:
        index = index * mesh.shape[name] + lax.axis_index(name)
    return dataclasses.replace(inputs, dropout_rng=jax.random.fold_in(inputs.dropout_rng, index))


def run_sharded(
    impl: Callable[[Any, OperationMetadata, Hardware], Output],
    inputs: AttentionInputs | PagedAttentionInputs,
    request: AttentionRequest,
    metadata: OperationMetadata,
    hardware: Hardware,
) -> Output:
    """Run `impl` (a backend, or a function called as one) over `metadata.mesh` with the
    specs of `metadata.get_shardings`."""
    mesh = metadata.mesh
    paged = isinstance(inputs, PagedAttentionInputs)
    rules = metadata.get_shardings(
        request.mode, "paged" if paged else "bshd",
        batch=None if paged else request.batch,
        num_q_heads=request.num_q_heads, num_kv_heads=request.num_kv_heads,
    )
    local_metadata = dataclasses.replace(metadata, mesh=None)
    if paged:
        in_specs: Any = _paged_specs(inputs, rules)
        out_specs: Any = (rules.output, rules.lse)
    else:
        if rules.kv_repeat > 1:
            inputs = dataclasses.replace(
                inputs,
                key=jnp.repeat(inputs.key, rules.kv_repeat, axis=2),
                value=jnp.repeat(inputs.value, rules.kv_repeat, axis=2),
            )
        in_specs = attention_specs(inputs, rules)
        out_specs = (rules.output, rules.lse)
    return_lse = paged or inputs.return_lse

    def body(local_inputs: Any) -> Any:
        if not paged:
            local_inputs = _fold_dropout(local_inputs, mesh)
        out, lse = impl(local_inputs, local_metadata, hardware)
        return (out, lse) if return_lse else (out, jnp.zeros((0,), jnp.float32))

    if not return_lse:
        out_specs = (rules.output, P())
    out, lse = shard_map(body, mesh=mesh, in_specs=(in_specs,), out_specs=out_specs)(inputs)
    return out, (lse if return_lse else None)
