"""The Mosaic forward's value guard on a Hopper GPU: what keeping a masked key's NaN value out of
the rows that do not see it costs, in its two forms, beside no guard and tokamax's default.

    python3 plugins/attn-flash/bench/bench_guard.py [CYCLES]

Forms (`MosaicSpec.guard_form`, `mosaic_kernels.GUARD_FORMS`): "flags" (one pass over v before
the kernel finds the (batch row, kv head) pairs holding a non-finite value, and only their blocks
clean the cut tiles), "retry" (every block runs unguarded first, and again guarded where its
output holds a non-finite value; no pass over v), "every block" (every block cleans its cut tiles,
no pass over v; the three other in-kernel forms tried on 2026-12-03 are in the plugin's
BENCHMARKS.md), "no guard"
(what a kernel without the guarantee costs; wrong on such inputs), and "attention" (the call as a
user makes it: `jaxattn.attention(..., backend="flash")`). First each form's NaN rows are checked
against the xla reference on inputs with non-finite values (`jaxattn.testing.nonfinite_problem`),
then the causal forward and a 4096-key window are timed: TFLOP/s of visible work, each column the
median of CYCLES samples of 10 calls taken in turn from every column (`jaxattn.bench.time_side_by_side`:
until 2026-12-03 each column was its best of ROUNDS whole-column rounds, which let the first and last
columns open every round; "attention" then ran 6-13% ahead of the same program as "retry").
"""

from __future__ import annotations

import functools
import sys
from dataclasses import replace

import jax
import jax.numpy as jnp

import jaxattn
from jaxattn import OperationMetadata
from jaxattn.bench import time_side_by_side
from jaxattn.inputs import AttentionInputs
from jaxattn.testing import assert_same_nonfinite, nonfinite_problem
from jaxattn_flash import backend as flash_backend
from jaxattn_flash.mosaic_kernels import MosaicSpec, mosaic_forward

CYCLES = 15
SHAPES = [  # (b, s, hq, hkv, d), window (None: causal)
    ((4, 4096, 32, 32, 128), None), ((4, 4096, 32, 8, 128), None), ((1, 16384, 16, 16, 128), None),
    ((8, 2048, 16, 16, 64), None), ((1, 32768, 32, 8, 128), 4096),
]


def mask_for(window):
    return jaxattn.CausalMask() if window is None else jaxattn.SlidingWindowMask(window - 1, 0)


def spec_for(q, k, v, mask, soft_cap=None) -> MosaicSpec:
    """The Mosaic spec the flash backend builds for this call (`mask`: a jaxattn mask or None) on this device."""
    inputs = AttentionInputs(q, k, v, mask=mask, scale=q.shape[-1] ** -0.5, logits_soft_cap=soft_cap)
    return flash_backend._prepare(inputs, OperationMetadata(), False, None).mosaic


def forms(q, k, v, window):
    """name -> jitted (q, k, v) -> (out, lse), for arrays shaped like these."""
    mask = mask_for(window)
    spec = spec_for(q, k, v, mask)

    def kernel(**changes):
        changed = replace(spec, **changes)
        return jax.jit(lambda q, k, v: mosaic_forward(changed, q, k, v))

    tokamax = tokamax_forward() if window is None else None
    return {
        "attention": jax.jit(lambda q, k, v: jaxattn.attention(q, k, v, mask=mask, backend="flash", return_lse=True)),
        "flags": kernel(guard_form="flags"),
        "retry": kernel(guard_form="retry"),
        "every block": kernel(guard_form="every block"),
        "no guard": kernel(guard_values=False),
        **({"tokamax": tokamax} if tokamax is not None else {}),
    }


def tokamax_forward():
    try:
        import tokamax
    except Exception:  # noqa: BLE001
        return None
    return jax.jit(lambda q, k, v: (tokamax.dot_product_attention(q, k, v, is_causal=True), None))


def random_qkv(shape):
    """bf16 q, k, v of a (b, s, hq, hkv, d) row, seeded by the row."""
    b, s, hq, hkv, d = shape
    ks = jax.random.split(jax.random.key(s + d), 3)
    return tuple(jax.random.normal(key, (b, s, heads, d), jnp.bfloat16) for key, heads in zip(ks, (hq, hkv, hkv)))


def forms_side_by_side(label: str, fns: dict, args: tuple, flops: float, cycles: int, names=None,
                       ref: str = "mufu", base: str = "plain (no cap)") -> None:
    """Print each of `names` (default all; [] for none) forms' first output's relative distance
    from form `ref`'s (bitwise or not; finite over every output), then every form's TFLOP/s
    (medians of `cycles` samples taken in turn) with its ratio to form `base`. A form that fails
    on its first call is a line, not the end, and is left out of the timing."""
    def first(result):
        return (result[0] if isinstance(result, tuple) else result).astype(jnp.float32)

    fns = dict(fns)
    names = list(fns) if names is None else names
    want = first(fns[ref](*args)) if names else None
    for name in names:
        try:
            result = fns[name](*args)
        except Exception as e:  # noqa: BLE001 - a form that cannot run is a line
            print(f"FAIL {label} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            del fns[name]
            continue
        got = first(result)
        err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        finite = all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(result))
        print(f"ERR {label} {name}: {err:.1e} bitwise={bool((got == want).all())} finite={finite}")
    seconds, failed = time_side_by_side({n: functools.partial(f, *args) for n, f in fns.items()}, repeats=cycles)
    speed = {n: flops / t / 1e12 for n, t in seconds.items()}
    parts = [f"{n} {t:.0f} ({t / speed.get(base, float('nan')):.3f})" for n, t in speed.items()]
    print(f"FORMS {label} TFLOP/s (x {base}): " + "  ".join(parts) + f"  failed {sorted(failed)}", flush=True)


def nan_verdict(out, lse, ref, ref_lse, label: str) -> str:
    """"ok" where out/lse have xla's NaN rows and values (`assert_same_nonfinite`), else "FAIL why"."""
    try:
        assert_same_nonfinite(out, lse, ref, ref_lse, label, rtol=3e-2, atol=3e-2)
        return "ok"
    except AssertionError as err:
        return f"FAIL {str(err)[:300]}"


def check_nan_rows() -> None:
    """Each guarded form's NaN rows and values against xla's on small inputs with NaN/inf values."""
    for shape, window in (((2, 1024, 4, 2, 128), None), ((2, 1024, 4, 2, 64), None), ((2, 2048, 4, 2, 128), 384)):
        fns = None
        for seed in (0, 3, 6):
            x = nonfinite_problem(seed, shape, bad_keys=False, dtype=jnp.bfloat16)
            q, k, v = x["query"], x["key"], x["value"]
            fns = fns or forms(q, k, v, window)  # one compile per shape, not per seed
            ref, ref_lse = jaxattn.attention(*(t.astype(jnp.float32) for t in (q, k, v)), mask=mask_for(window),
                                             backend="xla", return_lse=True)
            for name, f in fns.items():
                if name in ("no guard", "tokamax"):
                    continue
                out, lse = f(q, k, v)
                verdict = nan_verdict(out, lse, ref, ref_lse, f"{name} {shape} window={window} seed={seed}")
                print(f"NAN {shape} window={window} seed={seed} {name}: {verdict}", flush=True)


def timing(cycles: int) -> None:
    for shape, window in SHAPES:
        b, s, hq, hkv, d = shape
        q, k, v = random_qkv(shape)
        visible = s * (s + 1) / 2 if window is None else s * window - window * (window - 1) / 2
        flops = 4 * b * hq * d * visible
        fns = forms(q, k, v, window)
        ref = fns["no guard"](q, k, v)[0].astype(jnp.float32)
        for name, f in fns.items():
            out = f(q, k, v)[0].astype(jnp.float32)
            err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
            print(f"DIFF {shape} window={window} {name}: {err:.1e}")
        seconds, failed = time_side_by_side({n: functools.partial(f, q, k, v) for n, f in fns.items()},
                                            repeats=cycles)
        tflops = {n: flops / t / 1e12 for n, t in seconds.items()}
        tflops.update({n: float("nan") for n in failed})
        print(f"GUARD {shape} {'causal' if window is None else f'window {window}'} fwd TFLOP/s: "
              + "  ".join(f"{n} {t:.0f}" for n, t in tflops.items()), flush=True)


if __name__ == "__main__":
    print("jax", jax.__version__, jax.devices()[0].device_kind)
    check_nan_rows()
    timing(int(sys.argv[1]) if len(sys.argv) > 1 else CYCLES)
