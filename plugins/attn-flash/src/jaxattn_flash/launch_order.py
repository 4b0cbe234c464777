"""Launch passes: which (block, batch, head) a program of a 3-d grid takes.

Triton launches a grid's programs in order of the linear id (first axis fastest), and a
GPU runs only a few hundred at once. In the causal dk/dv kernel the first k/v blocks of
every (batch, head) are the heavy ones (they see the most queries), so launching group
after group ends the kernel with a tail in which the heavy blocks of the last groups run
while most SMs idle. That tail matters when the programs are few and long: grouped-query
attention, whose dk/dv program loops over all the query heads of its group.

With `passes` p > 1 the launch runs through every group p times: pass 0 takes the
heavier half of each group's blocks, pass 1 half of the rest, and so on, so the last
programs launched are the light ones. The remap is a bijection of the grid; each kernel
and each of its index maps apply the same one. `bench/tail_model.py` models the tail;
BENCHMARKS.md has the measurements that set where it is used.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def pass_bounds(n: int, passes: int) -> list[int]:
    """Cut points of `n` blocks into `passes` launch passes: `[0, ..., n]`, each pass the
    first half of what is left (fewer passes when the blocks run out)."""
    bounds, lo = [0], 0
    for _ in range(passes - 1):
        rest = n - lo
        if rest < 2:
            break
        lo += rest // 2
        bounds.append(lo)
    bounds.append(n)
    return bounds


def launch_order(i, bb, h, n: int, nb: int, nh: int, passes: int):
    """Grid ids `(i, bb, h)` of a grid `(n, nb, nh)` -> the `(block, batch, head)` that
    program works on. `passes == 1` is the identity (no arithmetic in the kernel)."""
    if passes == 1:
        return i, bb, h
    lin = jnp.asarray(i, jnp.int32) + n * (jnp.asarray(bb, jnp.int32) + nb * jnp.asarray(h, jnp.int32))
    groups = nb * nh
    block = group = jnp.zeros_like(lin)
    bounds = pass_bounds(n, passes)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        width = hi - lo
        rank = lin - groups * lo  # position inside this pass (negative: an earlier pass)
        group_k = lax.div(jnp.maximum(rank, 0), jnp.int32(width))
        inside = rank >= 0
        block = jnp.where(inside, lo + rank - group_k * width, block)
        group = jnp.where(inside, group_k, group)
    head = lax.div(group, jnp.int32(nb))
    return block, group - head * nb, head


def ordered(index_map, n: int, nb: int, nh: int, passes: int):
    """`index_map` (of grid ids `(block, batch, head)`) composed with the launch order."""
    if passes == 1:
        return index_map
    return lambda i, bb, h: index_map(*launch_order(i, bb, h, n, nb, nh, passes))


def clustered_order(i, g, n: int, groups: int, cluster: int):
    """Grid ids `(i, g)` of a launch that runs block `i` fastest (`n` blocks per group), then group
    `g` (`groups` of them) -> the `(block, group)` that program works on, launching `cluster`
    groups at a time block by block: block 0 of the cluster's groups, then block 1, and so on.
    Where the first blocks are the heavy ones (causal), the launch no longer ends on the heavy
    blocks of its last groups, while the programs in flight still span about as many groups as
    in the plain order (their K/V or Q/dO streams shared in L2). `cluster` <= 1: the identity."""
    if cluster <= 1:
        return i, g
    lin = jnp.asarray(i, jnp.int32) + n * jnp.asarray(g, jnp.int32)
    first = lax.div(lin, jnp.int32(cluster * n)) * cluster  # this cluster's first group
    within = lin - first * n
    size = jnp.minimum(cluster, groups - first)  # the last cluster may be smaller
    block = lax.div(within, size)
    return block, first + within - block * size


def clustered_ids(i, bb, h, n: int, nb: int, nh: int, cluster: int):
    """`clustered_order` on the ids `(i, bb, h)` of a grid `(n, nb, nh)` launched `i` fastest, then
    head, then batch (the order `launch_order` takes) -> the `(block, batch, head)` that program
    works on; the (batch, head) pairs are its groups."""
    block, pair = clustered_order(i, h + nh * bb, n, nb * nh, cluster)
    return block, lax.div(pair, jnp.int32(nh)), lax.rem(pair, jnp.int32(nh))
