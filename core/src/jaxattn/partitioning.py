"""Backends that XLA cannot partition, run shard by shard under plain `jax.jit`.

XLA partitions ordinary operations by the shardings of their inputs, but not a Pallas
kernel: given batch- or head-sharded inputs it gathers them and runs the kernel on every
device over everything, so a sharded model gets slower, not faster. A backend that
declares `partitioning = "shard"` (our Pallas backends do) is therefore wrapped in
`jax.experimental.custom_partitioning` by `attention` and `paged_attention`: XLA asks,
at partitioning time, how its inputs are sharded, and each device runs the backend on its
own batch and head shard, the output keeping the input's sharding. This works with no mesh
given (the shardings are read where XLA knows them, which a `shard_map` built at trace time
could not do, since plain-jit tracers carry no sharding); `metadata.mesh` remains the
explicit way and gives the same result.

Only batch and heads are split; a sequence-sharded input is gathered (context parallelism
needs `metadata.mesh` with a sequence axis, `jaxattn.parallel`). The backward pass is a
second partitioned call: the backend's `backward` from the forward's output and lse where
it has one, else the forward recomputed and differentiated on each shard (correct for any
backend, one forward dearer). Gradients of arrays shared across shards (sinks, a bias
broadcast over the batch) are summed over the shards.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import ArrayMapping, CompoundFactor, SdyShardingRule, custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .hardware import Hardware
from .inputs import AttentionInputs, PagedAttentionInputs
from .metadata import AttnShardingRules, OperationMetadata
from .operation import OperationImpl
from .sharding import attention_specs

BATCH, HEADS, KV_HEADS = "b", "hq", "hk"
_ATTENTION_ROLES = AttnShardingRules(
    query=P("b", "sq", "hq", "d"), key=P("b", "skv", "hk", "d"), value=P("b", "skv", "hk", "dv"),
    bias=P("b", "hq", "sq", "skv"), mask=P("b", "hq", "sq", "skv"), output=P("b", "sq", "hq", "dv"),
    q_segment_ids=P("b", "sq"), kv_segment_ids=P("b", "skv"), softmax_aux=P("hq"), lse=P("b", "hq", "sq"),
    seq_lengths=P("b"),
)
_DIFFERENTIABLE = ("query", "key", "value", "bias", "sinks")


def _roles(inputs: AttentionInputs | PagedAttentionInputs) -> list[tuple[str | None, ...]]:
    """Per leaf of `inputs` (flattened), the role of each dimension (None: not split)."""
    if isinstance(inputs, AttentionInputs):
        tree = attention_specs(inputs, _ATTENTION_ROLES)
    else:
        seqs = "t" if inputs.cu_q_lens is not None else "b"  # decode: one query row per sequence
        tree = dataclasses.replace(
            inputs, query=P(seqs, "hq", "d"), key_pages=P("p", "ps", "hk", "d"), value_pages=P("p", "ps", "hk", "dv"),
            kv_lengths=P("b"), page_indices=P("b", "pp"),
            cu_q_lens=None if inputs.cu_q_lens is None else P("c"), sinks=None if inputs.sinks is None else P("hq"),
            k_scale=_scale_role(inputs.k_scale), v_scale=_scale_role(inputs.v_scale))
    specs = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, P))
    leaves = jax.tree_util.tree_leaves(inputs)
    return [tuple(spec)[len(tuple(spec)) - leaf.ndim:] if leaf.ndim <= len(tuple(spec)) else (None,) * leaf.ndim
            for spec, leaf in zip(specs, leaves)]


def _scale_role(scale: Any) -> Any:
    """Per token and head scales split like their pages' heads; a scalar is not split."""
    return None if scale is None else P("p", "ps", "hk")  # trimmed to a scalar's () below


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The static facts of one partitioned call: roles of every leaf, sizes, the backend."""

    impl: OperationImpl
    treedef: Any
    roles: tuple[tuple[str | None, ...], ...]
    out_roles: tuple[tuple[str | None, ...], ...]
    group: int
    differentiable: tuple[int, ...]  # leaf indices of query, key, value, bias, sinks
    rng: int | None  # leaf index of the dropout key
    hardware: Hardware
    metadata_key: str  # the metadata's repr: what a cached partitioned call is keyed on
    metadata: OperationMetadata = dataclasses.field(hash=False, compare=False)

    def mapping(self, role: tuple[str | None, ...], index: int) -> ArrayMapping:
        dims = []
        for d, factor in enumerate(role):
            if factor == HEADS and self.group > 1:
                dims.append(CompoundFactor(KV_HEADS, "g"))
            elif factor == HEADS:
                dims.append(KV_HEADS)
            else:
                dims.append(factor or f"x{index}_{d}")
        return ArrayMapping(*dims)

    def rule(self, operand_roles: list[tuple[str | None, ...]], result_roles: list[tuple[str | None, ...]]) -> Any:
        operands = tuple(self.mapping(r, i) for i, r in enumerate(operand_roles))
        results = tuple(self.mapping(r, 1000 + i) for i, r in enumerate(result_roles))
        order: list[str] = []  # factors in order of first appearance: Shardy wants special factors sorted
        for m in operands + results:
            for dim in m:
                for f in (tuple(dim) if isinstance(dim, CompoundFactor) else (dim,)):
                    if f not in order:
                        order.append(f)
        kept = {BATCH, KV_HEADS, "g"}
        sizes = {"g": self.group} if self.group > 1 else {}
        return SdyShardingRule(operands, results, need_replication_factors=tuple(f for f in order if f not in kept),
                               **sizes)


def _axes(mesh: Any, spec: Any, size: int) -> tuple[str, ...] | None:
    """The mesh axes of one spec entry, if they divide `size` (else None: replicate)."""
    if spec is None:
        return None
    names = (spec,) if isinstance(spec, str) else tuple(spec)
    return names if size % math.prod(mesh.shape[n] for n in names) == 0 else None


def _split(layout: _Layout, mesh: Any, arg_shapes: Any) -> tuple[Any, Any]:
    """Batch and head mesh axes, read from the query's sharding (heads only if they divide K/V heads)."""
    q_role, q = layout.roles[0], arg_shapes[0]
    spec = tuple(q.sharding.spec) + (None,) * (q.ndim - len(tuple(q.sharding.spec)))
    batch = heads = None
    if BATCH in q_role:
        batch = _axes(mesh, spec[q_role.index(BATCH)], q.shape[q_role.index(BATCH)])
    hkv = q.shape[q_role.index(HEADS)] // layout.group
    heads = _axes(mesh, spec[q_role.index(HEADS)], hkv)
    return batch, heads


def _sharding(mesh: Any, role: tuple[str | None, ...], batch: Any, heads: Any) -> NamedSharding:
    entry = {BATCH: batch, HEADS: heads, KV_HEADS: heads}
    return NamedSharding(mesh, P(*(entry.get(f) for f in role)))


def _shard_keys(layout: _Layout, leaves: tuple[jax.Array, ...], axes: tuple[str, ...]) -> tuple[jax.Array, ...]:
    """Each shard's own dropout key (the key folded with the shard's position), so shards
    do not repeat one keep-mask; the backward pass folds the same way."""
    if layout.rng is None or not axes:
        return leaves
    index = jnp.int32(0)
    for name in axes:
        index = index * jax.lax.psum(1, name) + jax.lax.axis_index(name)
    leaves = list(leaves)
    leaves[layout.rng] = jax.random.fold_in(leaves[layout.rng], index)
    return tuple(leaves)


def _forward_body(layout: _Layout, *leaves: jax.Array) -> tuple[jax.Array, jax.Array]:
    inputs = jax.tree_util.tree_unflatten(layout.treedef, leaves)
    if isinstance(inputs, AttentionInputs):
        inputs = inputs.replace(return_lse=True)
    out, lse = layout.impl(inputs, layout.metadata, layout.hardware)
    if lse is None and isinstance(inputs, PagedAttentionInputs):  # paged_attention never returns it
        lse = jnp.zeros((inputs.query.shape[1], inputs.query.shape[0]), jnp.float32)
    elif lse is None:
        raise RuntimeError(f"backend {layout.impl.name!r} returned no lse although return_lse=True")
    return out, lse


def _backward_body(layout: _Layout, *args: jax.Array) -> tuple[jax.Array, ...]:
    n = len(layout.roles)
    leaves, (out, lse, d_out, d_lse) = list(args[:n]), args[n:]
    inputs = jax.tree_util.tree_unflatten(layout.treedef, leaves).replace(return_lse=True)
    grads = layout.impl.backward(inputs, out, lse, d_out, d_lse, layout.metadata, layout.hardware)
    if grads is None:  # no backward of its own: differentiate the forward again, on this shard
        def f(*diff: jax.Array) -> Any:
            new = list(leaves)
            for i, x in zip(layout.differentiable, diff):
                new[i] = x
            return _forward_body(layout, *new)

        _, vjp = jax.vjp(f, *(leaves[i] for i in layout.differentiable))
        return tuple(vjp((d_out, d_lse)))
    names = [name for name in _DIFFERENTIABLE if getattr(inputs, name) is not None]
    return tuple(grads[name] for name in names)


@functools.lru_cache(maxsize=64)
def _partitioned(layout: _Layout) -> Callable[..., Any]:
    """The custom_vjp of the partitioned forward and backward for one layout (cached, so
    eager calls reuse their compilations)."""
    n = len(layout.roles)
    forward = custom_partitioning(functools.partial(_forward_body, layout))
    backward = custom_partitioning(functools.partial(_backward_body, layout))
    diff_roles = [layout.roles[i] for i in layout.differentiable]

    def forward_partition(mesh, arg_shapes, result_shape):
        batch, heads = _split(layout, mesh, arg_shapes)
        args = tuple(_sharding(mesh, r, batch, heads) for r in layout.roles)
        outs = tuple(_sharding(mesh, r, batch, heads) for r in layout.out_roles)
        axes = tuple(n for a in (batch, heads) if a is not None for n in a)

        def lower(*local: jax.Array) -> tuple[jax.Array, jax.Array]:
            return _forward_body(layout, *_shard_keys(layout, local, axes))

        return mesh, lower, outs, args

    def backward_partition(mesh, arg_shapes, result_shape):
        batch, heads = _split(layout, mesh, arg_shapes)
        roles = list(layout.roles) + list(layout.out_roles) * 2
        args = tuple(_sharding(mesh, r, batch, heads) for r in roles)
        outs = tuple(_sharding(mesh, r, batch, heads) for r in diff_roles)

        axes = tuple(n for a in (batch, heads) if a is not None for n in a)

        def lower(*local: jax.Array) -> tuple[jax.Array, ...]:
            keyed = _shard_keys(layout, local[:len(layout.roles)], axes) + tuple(local[len(layout.roles):])
            grads = list(_backward_body(layout, *keyed))
            for i, role in enumerate(diff_roles):  # sum what every shard of an axis shares
                shared = [a for f, a in ((BATCH, batch), (HEADS, heads)) if a is not None and f not in role
                          and not (f == HEADS and KV_HEADS in role)]
                if shared:
                    grads[i] = jax.lax.psum(grads[i], tuple(n for a in shared for n in a))
            return tuple(grads)

        return mesh, lower, outs, args

    def forward_infer(mesh, arg_shapes, result_shape):
        batch, heads = _split(layout, mesh, arg_shapes)
        return tuple(_sharding(mesh, r, batch, heads) for r in layout.out_roles)

    def backward_infer(mesh, arg_shapes, result_shape):
        batch, heads = _split(layout, mesh, arg_shapes)
        return tuple(_sharding(mesh, r, batch, heads) for r in diff_roles)

    forward.def_partition(forward_partition, infer_sharding_from_operands=forward_infer,
                          sharding_rule=layout.rule(list(layout.roles), list(layout.out_roles)))
    backward.def_partition(backward_partition, infer_sharding_from_operands=backward_infer,
                           sharding_rule=layout.rule(list(layout.roles) + list(layout.out_roles) * 2, diff_roles))

    @jax.custom_vjp
    def call(*leaves: jax.Array) -> tuple[jax.Array, jax.Array]:
        return forward(*leaves)

    def call_fwd(*leaves: jax.Array) -> Any:
        out, lse = forward(*leaves)
        return (out, lse), (leaves, out, lse)

    def call_bwd(residuals: Any, cotangents: Any) -> tuple[Any, ...]:
        leaves, out, lse = residuals
        d_out, d_lse = cotangents
        d_lse = jnp.where(jnp.isfinite(lse), d_lse, 0.0)
        grads = iter(backward(*leaves, out, lse, d_out.astype(out.dtype), d_lse.astype(jnp.float32)))
        return tuple(next(grads) if i in layout.differentiable else None for i in range(n))

    call.defvjp(call_fwd, call_bwd)
    return call


def run_partitioned(impl: OperationImpl, inputs: AttentionInputs | PagedAttentionInputs,
                    metadata: OperationMetadata, hardware: Hardware) -> tuple[jax.Array, jax.Array | None]:
    """`impl(inputs)`, each device running it on its own batch and head shard (see the module docstring)."""
    leaves, treedef = jax.tree_util.tree_flatten(inputs)
    q, k = (inputs.query, inputs.key) if isinstance(inputs, AttentionInputs) else (inputs.query, inputs.key_pages)
    group = q.shape[-2] // k.shape[-2]
    if isinstance(inputs, AttentionInputs):
        out_roles = (tuple(_ATTENTION_ROLES.output), tuple(_ATTENTION_ROLES.lse))
        differentiable = tuple(i for i, name in enumerate(_leaf_fields(inputs)) if name in _DIFFERENTIABLE)
    else:
        seqs = "t" if inputs.cu_q_lens is not None else "b"
        out_roles = ((seqs, "hq", "dv"), ("hq", seqs))
        differentiable = ()
    fields = _leaf_fields(inputs) if isinstance(inputs, AttentionInputs) else []
    rng = fields.index("dropout_rng") if "dropout_rng" in fields else None
    metadata = dataclasses.replace(metadata, mesh=None)
    layout = _Layout(impl, treedef, tuple(_roles(inputs)), out_roles, group, differentiable, rng, hardware,
                     repr(metadata), metadata)
    out, lse = _partitioned(layout)(*leaves)
    wants_lse = not isinstance(inputs, AttentionInputs) or inputs.return_lse
    return out, (lse if wants_lse else None)


def _leaf_fields(inputs: AttentionInputs) -> list[str]:
    """The field each leaf of `inputs` belongs to, in flattening order."""
    names = []
    for field in ("query", "key", "value", "bias", "mask", "sinks", "q_seq_lengths", "kv_seq_lengths", "dropout_rng"):
        names += [field] * len(jax.tree_util.tree_leaves(getattr(inputs, field)))
    return names
