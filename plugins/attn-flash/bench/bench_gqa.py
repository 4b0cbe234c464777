"""GQA (32 q / 8 kv heads) against MHA (32 / 32) at (4, 4096, ·, 128), timed in alternation.

    python3 bench/bench_gqa.py [ROUNDS]            # whole calls: flash fwd, fwd+bwd, Triton fwd; cuDNN fwd
    python3 bench/bench_gqa.py kernels [ROUNDS]    # each Triton kernel alone (fwd, dq, dk/dv)
    python3 bench/bench_gqa.py passes [ROUNDS]     # causal: dk/dv launch passes 1-4, kernel alone and fwd+bwd

Run-to-run spread on the H100 (~5%) is larger than the GQA/MHA difference the issue's bar
asks about, so both shapes are timed in one process, alternating: each round times 20
back-to-back calls of MHA, then of GQA (then the reverse order, to cancel drift). Prints the
median TFLOP/s of each and the median and spread of the per-round ratio GQA / MHA, for
flash's forward (what `auto` runs on Hopper), forward+backward, and cuDNN's forward beside it.
`kernels` times the Triton forward, dq and dk/dv kernels one by one on the same inputs, to
show which kernel carries a GQA/MHA difference of the backward. `passes` times the causal
dk/dv kernel and the whole fwd+bwd with 1 to 4 launch passes (`launch_passes_dkv`) on MHA,
GQA and MQA shapes, each against 1 pass in alternation.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from bench_flash import flash_fn, inputs, log, round_timer

import jaxattn
from jaxattn_flash import config as flash_config
from jaxattn_flash import triton_kernels as tk
from jaxattn_flash import triton_vjp as tv

NONE4 = (None,) * 4  # no segment ids, no lengths
SHAPES = {"mha": (4, 4096, 32, 32, 128), "gqa": (4, 4096, 32, 8, 128)}


def compare(name, make, causal, rounds, shapes=SHAPES):
    """`make(do)` -> a jitted f(q, k, v); both shapes timed in alternation."""
    timers = {}
    for key, shape in shapes.items():
        q, k, v, do = inputs(shape)
        timers[key] = round_timer(make(do), q, k, v)[0]
    alternate(name, timers, causal, rounds, shapes)


def alternate(name, timers, causal, rounds, shapes=SHAPES):
    times = {"mha": [], "gqa": []}
    for r in range(rounds):
        order = ("mha", "gqa") if r % 2 == 0 else ("gqa", "mha")
        for key in order:
            times[key].append(timers[key]())
    b, sq, hq, _, d = shapes["mha"]
    # the kernels' own matmuls: dq recomputes S and dP (3 matmuls: 1.5x the forward), dk/dv 4 (2x)
    share = 3.5 if "bwd" in name else 2.0 if "dkv" in name else 1.5 if "dq" in name else 1.0
    flops = 4 * b * hq * sq * sq * d * (0.5 if causal else 1.0) * share
    mha, gqa = np.array(times["mha"]), np.array(times["gqa"])
    ratio = mha / gqa  # > 1: GQA faster
    log(f"{name:28s} causal={causal!s:5s} mha {flops / np.median(mha) / 1e12:6.1f}  gqa "
        f"{flops / np.median(gqa) / 1e12:6.1f} TFLOP/s  speed gqa/mha median {np.median(ratio):.4f} "
        f"[min {ratio.min():.4f}, max {ratio.max():.4f}] over {rounds} rounds")


def kernel_spec(shape, causal, interpret=False):
    """The KernelSpec flash builds for an unpadded call of `shape` with default tiles."""
    b, s, hq, hk, d = shape
    tiles = flash_config.resolve({}, d, s, s)
    parts = jaxattn.mask_parts(jaxattn.CausalMask() if causal else None, s, s)
    return tk.KernelSpec(
        q_len=s, kv_len=s, q_pad=s, kv_pad=s, group=hq // hk, scale=1 / math.sqrt(d), soft_cap=None,
        band_lo=parts.band_lo, band_hi=parts.band_hi, chunk_size=None, chunk_offset=0,
        segments=False, q_lens=False, kv_lens=False, sinks=False,
        fwd=tiles["fwd"], dq=tiles["dq"], dkdv=tiles["dkv"], exact=False, interpret=interpret,
        dkdv_passes=flash_config.dkv_passes({}, hq // hk, parts))


def kernels(rounds, shapes=SHAPES, interpret=False):
    """Each Triton kernel alone, MHA and GQA in alternation."""
    for causal in (False, True):
        timers = {"fwd": {}, "dq": {}, "dkv": {}}
        for key, shape in shapes.items():
            spec = kernel_spec(shape, causal, interpret)
            q, k, v, do = inputs(shape)
            fwd = jax.jit(lambda q, k, v, spec=spec: tk.forward(spec, q, k, v, None, *NONE4))
            out, lse = fwd(q, k, v)
            delta = jnp.einsum("bshd,bshd->bhs", do.astype(jnp.float32), out.astype(jnp.float32))
            lse2 = lse * tk.LOG2E
            dq = jax.jit(lambda q, k, v, spec=spec, do=do, lse2=lse2, delta=delta:
                         tv.backward_dq(spec, q, k, v, do, lse2, delta, *NONE4))
            dkv = jax.jit(lambda q, k, v, spec=spec, do=do, lse2=lse2, delta=delta:
                          tv.backward_dkdv(spec, q, k, v, do, lse2, delta, *NONE4))
            for name, f in (("fwd", fwd), ("dq", dq), ("dkv", dkv)):
                timers[name][key] = round_timer(f, q, k, v)[0]
        for name, t in timers.items():
            alternate(f"triton {name} kernel", t, causal, rounds, shapes)


PASSES_SHAPES = {"mha": (4, 4096, 32, 32, 128), "gqa": (4, 4096, 32, 8, 128), "mqa": (4, 4096, 32, 1, 128),
                 "gqa d64": (8, 2048, 16, 4, 64), "gqa d256": (4, 4096, 32, 8, 256), "gqa 16k": (1, 16384, 32, 8, 128)}


def passes(rounds, shapes=PASSES_SHAPES, counts=(1, 2, 3, 4), interpret=False):
    """Causal dk/dv kernel and fwd+bwd with `counts` launch passes, alternated round by round."""
    log("jax", jax.__version__, jax.devices()[0].device_kind)
    timers = {}
    for key, shape in shapes.items():
        q, k, v, do = inputs(shape)
        spec = kernel_spec(shape, True, interpret)
        out, lse = jax.jit(lambda q, k, v, spec=spec: tk.forward(spec, q, k, v, None, *NONE4))(q, k, v)
        delta = jnp.einsum("bshd,bshd->bhs", do.astype(jnp.float32), out.astype(jnp.float32))
        lse2 = lse * tk.LOG2E
        for n in counts:
            spec_n = dataclasses.replace(spec, dkdv_passes=n)
            dkv = jax.jit(lambda q, k, v, s=spec_n, do=do, lse2=lse2, delta=delta:
                          tv.backward_dkdv(s, q, k, v, do, lse2, delta, *NONE4))
            timers[(key, "dk/dv", n)] = round_timer(dkv, q, k, v)[0]
            if not interpret:
                f = flash_fn(True, config={"launch_passes_dkv": n})
                timers[(key, "fwd+bwd", n)] = round_timer(
                    jax.jit(lambda q, k, v, f=f, do=do: jax.vjp(f, q, k, v)[1](do)), q, k, v)[0]
    times = {key: [] for key in timers}
    for r in range(rounds):
        for key in (list(timers) if r % 2 == 0 else list(timers)[::-1]):
            times[key].append(timers[key]())
    for (key, what, n), t in times.items():
        b, s, hq, _, d = shapes[key]
        flops = 4 * b * hq * s * s * d * 0.5 * (2.0 if what == "dk/dv" else 3.5)
        speed = np.array(times[(key, what, counts[0])]) / np.array(t)
        log(f"{key:9s} causal {what:7s} passes {n}: {flops / np.median(t) / 1e12:6.1f} TFLOP/s  speed vs "
            f"{counts[0]} pass median {np.median(speed):.3f} [min {speed.min():.3f}, max {speed.max():.3f}]")


def main():
    if sys.argv[1:2] == ["kernels"]:
        kernels(int(sys.argv[2]) if len(sys.argv) > 2 else 15)
        return
    if sys.argv[1:2] == ["passes"]:
        passes(int(sys.argv[2]) if len(sys.argv) > 2 else 8)
        return
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    log("jax", jax.__version__, jax.devices()[0].device_kind)
    for causal in (False, True):
        fwd = flash_fn(causal)
        compare("flash fwd", lambda do, f=fwd: jax.jit(f), causal, rounds)
        compare("flash fwd+bwd", lambda do, f=fwd: jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](do)),
                causal, rounds)
        compare("cudnn fwd (jax.nn)", lambda do, c=causal: jax.jit(
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=c, implementation="cudnn")),
            causal, rounds)
        compare("flash fwd triton", lambda do, c=causal: jax.jit(flash_fn(c, config={"gpu_kernel": "triton"})),
                causal, rounds)


if __name__ == "__main__":
    main()
