"""Issue 16's causal forward gap to tokamax, taken apart: experiments for one device call.

    python3 plugins/attn-flash/bench/bench_causal_gap.py [CYCLES]         # E1 and E2
    python3 plugins/attn-flash/bench/bench_causal_gap.py combos [CYCLES]  # E3
    python3 plugins/attn-flash/bench/bench_causal_gap.py fence [CYCLES]   # E4
    python3 plugins/attn-flash/bench/bench_causal_gap.py vote [CYCLES]    # E6

On an H200 the Mosaic forward is level with tokamax 0.0.17's default without a mask and 0.98–0.99x
it on causal rows (BENCHMARKS.md, "`auto` timed side by side"); flash BENCHMARKS.md, "What holds it
back (2026-12-03)", lists what a reading of tokamax's kernel found different. tokamax runs a persistent kernel
without a mask and a grid of blocks with one (its `Config.persistent`), so the two regimes differ:

* E1, no mask: ours, tokamax's default, and tokamax with `persistent=False` (its causal regime's
  kernel on the unmasked work): if ours beats the latter, the causal gap is launch order or per
  block; if not, per tile.
* E2, causal at 32k tokens per call, rows 2k to 32k long (32 q / 8 kv heads, head_dim 128): ours,
  tokamax's default, and ours with one knob changed each: launch cluster 1 (the grid's order),
  `fence` (an optimization barrier after the softmax, as tokamax orders its sums), no value guard
  (`guard_values=False`: a probe only, which would let a masked key's NaN value reach rows that do
  not see it), no lse output (`MosaicSpec.lse=False`: tokamax stores none on a forward-only call).
  A gap that shrinks with longer rows is per block; a flat one per tile.
* E3 (`combos`), after E2 found each of fence, no guard and no lse about 2% faster than ours at
  2k-16k (2026-12-03): the same causal rows at 2k, 8k and 32k with a second copy of ours (a
  control: a knob's gain within the copy's distance from ours is noise) and the knobs together.
* E4 (`fence`): the fence alone beside ours and its copy on the calls E2/E3 did not cover: no
  mask, the table's causal shapes (32/32 and 16/16 heads), soft-cap 50 and window 4096 at 32k.
* E5 (2026-12-03, removed after it): O stored in two column halves from a buffer of their own,
  as tokamax stores it: level with one store (flash BENCHMARKS.md).
* E6 (`vote`): the retry's vote on the whole output tile while the O store is in flight
  (`MosaicSpec.early_vote`), beside ours with and without the lse (the backend's forward-only
  form since E5), causal at 2k, 8k and 32k: the guard's per-block cost.

Medians of CYCLES samples taken in turn (`jaxattn.bench.time_side_by_side`), TFLOP/s of the
visible pairs, each column over tokamax's default in brackets; each form's output against the
default form's (bitwise for the knobs that change only order or scheduling).
"""

from __future__ import annotations

import sys
from dataclasses import replace

import jax
from bench_guard import forms_side_by_side, random_qkv, spec_for

import jaxattn
from jaxattn_flash.mosaic_kernels import mosaic_forward

CYCLES = 15
HEADS = (32, 8, 128)
TOKENS = 32768
CAUSAL_LENGTHS = (2048, 4096, 8192, 16384, 32768)
FULL_ROWS = ((4, 4096), (1, 16384))
OURS = {"ours": {}, "ours cluster 1": {"cluster": 1}, "ours fence": {"fence": True},
        "ours no guard": {"guard_values": False}, "ours no lse": {"lse": False}}
COMBOS = {"ours": {}, "ours copy": {}, "ours fence": {"fence": True},
          "ours fence no lse": {"fence": True, "lse": False},
          "ours fence no lse no guard": {"fence": True, "lse": False, "guard_values": False}}
COMBO_LENGTHS = (2048, 8192, 32768)


def tokamax_forms(causal: bool) -> dict:
    """name -> jitted (q, k, v) -> out of tokamax's default and, where it imports, its sm90 kernel
    with `persistent=False` (empty where tokamax does not import: it needs jax >= 0.11.1)."""
    try:
        import tokamax
        from tokamax._src.ops.attention import pallas_mosaic_gpu as tk_mosaic
        from tokamax._src.ops.attention import pallas_mosaic_gpu_kernel_sm90 as tk_sm90
    except Exception as e:  # noqa: BLE001 - any failure means "no tokamax here"
        print(f"tokamax: not importable ({type(e).__name__}: {str(e)[:200]})")
        return {}
    forms = {"tokamax": jax.jit(lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=causal))}
    try:
        op = tk_mosaic.PallasMosaicGpuFlashAttention(
            config=tk_sm90.Config(block_q=64, block_kv=128, num_stages=2, persistent=False))
        forms["tokamax not persistent"] = jax.jit(lambda q, k, v: op(q, k, v, is_causal=causal))
    except Exception as e:  # noqa: BLE001 - its private API may differ between versions
        print(f"tokamax persistent=False: cannot build ({type(e).__name__}: {str(e)[:200]})")
    return forms


def row(label: str, shape, causal: bool, ours: dict, cycles: int, window=None, soft_cap=None) -> None:
    """`ours` forms (name -> MosaicSpec changes) beside tokamax's (plain causal or no mask only)."""
    b, s, hq, hkv, d = shape
    q, k, v = random_qkv(shape)
    mask = (jaxattn.SlidingWindowMask(window - 1, 0) if window else jaxattn.CausalMask()) if causal else None
    spec = spec_for(q, k, v, mask, soft_cap)
    specs = {name: replace(spec, **changes) for name, changes in ours.items()}
    fns = {name: jax.jit(lambda q, k, v, sp=sp: mosaic_forward(sp, q, k, v)[0]) for name, sp in specs.items()}
    if window is None and soft_cap is None:
        fns.update(tokamax_forms(causal))
    if not causal:
        pairs = s * s
    elif window is None:
        pairs = s * (s + 1) / 2
    else:
        pairs = window * (window + 1) / 2 + (s - window) * window
    base = "tokamax" if "tokamax" in fns else "ours"
    forms_side_by_side(f"{label} fwd", fns, (q, k, v), 4 * b * hq * d * pairs, cycles, ref="ours", base=base)


def combos(cycles: int) -> None:
    hq, hkv, d = HEADS
    for s in COMBO_LENGTHS:  # E3
        b = TOKENS // s
        row(f"E3 causal ({b}, {s}, {hq}/{hkv}, {d})", (b, s, hq, hkv, d), True, COMBOS, cycles)


FENCE = {"ours": {}, "ours copy": {}, "ours fence": {"fence": True}}
FENCE_ROWS = (  # label, shape, causal, window, soft_cap
    ("E4 full", (4, 4096, 32, 8, 128), False, None, None),
    ("E4 full", (1, 16384, 16, 16, 128), False, None, None),
    ("E4 causal", (4, 4096, 32, 32, 128), True, None, None),
    ("E4 causal", (1, 16384, 16, 16, 128), True, None, None),
    ("E4 causal soft-cap 50", (1, 32768, 32, 8, 128), True, None, 50.0),
    ("E4 window 4096", (1, 32768, 32, 8, 128), True, 4096, None),
)


VOTE = {"ours": {}, "ours no lse": {"lse": False}, "ours no lse copy": {"lse": False},
        "early vote no lse": {"lse": False, "early_vote": True},
        "no guard no lse": {"lse": False, "guard_values": False}}  # a probe: what the guard costs at most
VOTE_ROWS = tuple(("E6 causal", (TOKENS // s, s, *HEADS), True) for s in (2048, 8192, 32768))


def rows_of(forms: dict, rows, cycles: int) -> None:
    """`row` of `forms` for each (label, shape, causal[, window, soft_cap]) of `rows`."""
    for label, shape, causal, *extra in rows:
        window, soft_cap = (*extra, None, None)[:2]
        b, s, hq, hkv, d = shape
        try:
            row(f"{label} ({b}, {s}, {hq}/{hkv}, {d})", shape, causal, forms, cycles, window=window, soft_cap=soft_cap)
        except Exception as e:  # noqa: BLE001 - one row's failure is a line, not the end of the call
            print(f"FAIL {label} {shape}: {type(e).__name__}: {str(e)[:300]}", flush=True)


def vote(cycles: int) -> None:
    rows_of(VOTE, VOTE_ROWS, cycles)


def fence(cycles: int) -> None:
    rows_of(FENCE, FENCE_ROWS, cycles)


def main(cycles: int) -> None:
    hq, hkv, d = HEADS
    for b, s in FULL_ROWS:  # E1
        row(f"E1 full ({b}, {s}, {hq}/{hkv}, {d})", (b, s, hq, hkv, d), False, {"ours": {}}, cycles)
    for s in CAUSAL_LENGTHS:  # E2
        b = TOKENS // s
        row(f"E2 causal ({b}, {s}, {hq}/{hkv}, {d})", (b, s, hq, hkv, d), True, OURS, cycles)


if __name__ == "__main__":
    print(f"jax {jax.__version__} {jax.devices()[0].device_kind}", flush=True)
    experiments = {"combos": combos, "fence": fence, "vote": vote}
    if len(sys.argv) > 1 and sys.argv[1] in experiments:
        experiments[sys.argv[1]](int(sys.argv[2]) if len(sys.argv) > 2 else CYCLES)
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else CYCLES)
