"""A model of the causal dk/dv kernel's launch tail: why GQA loses to MHA there.

    python3 bench/tail_model.py           # the Triton dk/dv grid: plain order and passes
    python3 bench/tail_model.py mosaic    # the Mosaic grids: plain order, passes, clusters

The dk/dv grid is `(kv blocks, batch, kv heads)`; the GPU starts programs in that order (the
kv-block axis fastest) and gives the next one to whichever slot frees first. Under a causal
mask, kv block j of n sees the query blocks j..n-1 of each of the `group` query heads, so a
program's work is `(n - j) * group` tiles. With GQA (group 4) there are 4x fewer, 4x longer
programs than with MHA, and the launch ends on the heaviest programs of the last (batch, head):
slots idle while those finish. This model (greedy list scheduling, no memory effects) prints
the kernel time over the ideal `total work / slots` for the launch order the kernel uses and
for "passes": every (batch, head)'s heaviest half of the blocks in pass 1, half of what is left
in pass 2, and so on, so that the last launched programs are light. Slots = SMs (132 on an
H100) times the programs one SM holds at once (1 or 2 for the 64x64 dk/dv tiles).

`mosaic` models the Mosaic kernels (one program per SM): the forward (query blocks of 128 rows,
heaviest first per (batch, head)), the 128-key dk/dv kernel and the wide one (64 keys), in the
plain order, in 4 passes and in clusters (`launch_order.clustered_order`: C groups launched
block index by block index, which keeps the programs in flight on as few groups as the plain
order while the last launched programs are light).
"""

from __future__ import annotations

import heapq
import sys

from jaxattn_flash.launch_order import pass_bounds  # the cut points the kernel launches by

SHAPES = {"mha (4, 4096, 32/32, 128)": (4, 32, 1), "gqa (4, 4096, 32/8, 128)": (4, 8, 4)}
N_BLOCKS = 4096 // 64


def launch_works(batch: int, heads: int, group: int, n: int, passes: int) -> list[int]:
    """Tiles of work of each program, in launch order."""
    bounds = pass_bounds(n, passes)
    return [(n - j) * group
            for lo, hi in zip(bounds[:-1], bounds[1:])
            for _ in range(batch * heads)
            for j in range(lo, hi)]


def span_over_ideal(works: list[int], slots: int) -> float:
    free_at = [0] * slots
    for w in works:
        heapq.heappush(free_at, heapq.heappop(free_at) + w)
    return max(free_at) / (sum(works) / slots)


def clustered_works(groups: int, group_size: int, n: int, cluster: int, heavy=lambda j, n: n - j) -> list[int]:
    """Work of each program in the clustered launch order: cluster by cluster, block by block."""
    return [heavy(j, n) * group_size for c in range(0, groups, cluster) for j in range(n)
            for _ in range(c, min(groups, c + cluster))]


# name: (groups = batch x heads of the grid, work per tile-row (GQA group), blocks per group)
MOSAIC = {
    "fwd (4, 4096, 32, 128)": (4 * 32, 1, 4096 // 128),
    "fwd (8, 2048, 16, 64)": (8 * 16, 1, 2048 // 128),
    "fwd (1, 16384, 16, 128)": (16, 1, 16384 // 128),
    "dk/dv (4, 4096, 32/32, 128)": (4 * 32, 1, 4096 // 128),
    "dk/dv (4, 4096, 32/8, 128)": (4 * 8, 4, 4096 // 128),
    "dk/dv (8, 2048, 16/16, 64)": (8 * 16, 1, 2048 // 128),
    "dk/dv wide (2, 4096, 16/4, 256)": (2 * 4, 4, 4096 // 64),
}


def mosaic(slots: int = 132) -> None:
    print(f"{'grid':32s} {'plain':>7s} {'passes=4':>9s} " + " ".join(f"{'C=' + str(c):>7s}" for c in (2, 4, 8, 16)))
    for name, (groups, size, n) in MOSAIC.items():
        plain = span_over_ideal(clustered_works(groups, size, n, 1), slots)
        passes = span_over_ideal(launch_works(1, groups, size, n, 4), slots)
        clusters = [span_over_ideal(clustered_works(groups, size, n, c), slots) for c in (2, 4, 8, 16)]
        print(f"{name:32s} {plain:7.3f} {passes:9.3f} " + " ".join(f"{x:7.3f}" for x in clusters))


def main():
    print(f"{'shape':28s} {'slots':>5s}  " + "  ".join(f"passes={p}" for p in (1, 2, 3, 4)))
    for name, (batch, heads, group) in SHAPES.items():
        for slots in (132, 264):
            spans = [span_over_ideal(launch_works(batch, heads, group, N_BLOCKS, p), slots)
                     for p in (1, 2, 3, 4)]
            print(f"{name:28s} {slots:5d}  " + "  ".join(f"{s:8.3f}" for s in spans))


if __name__ == "__main__":
    mosaic() if sys.argv[1:] == ["mosaic"] else main()
