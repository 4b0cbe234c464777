"""Time forms of the Mosaic decode kernel (`mosaic_decode.py`) against each other, in alternated rounds.

    python3 plugins/attn-ragged/bench/decode_forms.py                  # the default forms, three shapes
    python3 plugins/attn-ragged/bench/decode_forms.py --shapes 32x8192 --forms "int8qk c2 s8 bk64"
    python3 plugins/attn-ragged/bench/decode_forms.py --smoke          # tiny, Mosaic GPU interpreter (CPU)

Decode, 32 q / 8 kv heads, head_dim 128, pages of 16, full sequences of `kv_len` tokens over a
shuffled page table; pages from float32 normals cast to bf16 (bf16 draws have a mean of -0.012,
which inflates quantization errors), int8 / fp8 pages from `jaxattn.quantize_kv`. Each round
times every form (20 calls after one warm-up); the median of five rounds is reported, with
tokens/s over the first bf16 form and the output's relative difference from the first form of
the same page dtype and (`unq`) from the first bf16 form's: what quantizing the cache costs. A
form is named by words: its page dtype (bf16, int8, int8qk: int8 with int8 K·Qᵀ, fp8, fp8qk:
fp8 with fp8 K·Qᵀ), then `cN` consumers, `sN` stages, `bkN` block_kv, `pwN` producer warps (1
or 4; default 4), `psN` pages of N tokens (default 16), `widener`, `halfsplits`, `ctaN` N
persistent blocks (`persistent`: one per SM), `seqs` the units in sequence order.
Why: the decode forms differ by a few percent, less than the spread between runs, so they are
compared inside one process, round by round (BENCHMARKS.md cites its logs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn_ragged._compat import num_sms
from jaxattn_ragged.kernel import DECODE_CONFIG, merge_splits
from jaxattn_ragged.mosaic_decode import mosaic_decode, one_wave_splits

HQ, HKV, D, PS = 32, 8, 128, 16
DEFAULT_FORMS = ("bf16 c1 s3", "bf16 c1 s3 pw1", "int8qk c2 s4", "int8qk c2 s4 pw1", "int8qk c1 s3 widener",
                 "int8qk c2 s4 ps64", "fp8 c2 s4 bk64", "fp8qk c2 s4", "fp8qk c2 s4 ps64")
PAGES = {"bf16": None, "int8": jnp.int8, "int8qk": jnp.int8, "fp8": jnp.float8_e4m3fn,
         "fp8qk": jnp.float8_e4m3fn}


def parse_form(name: str) -> tuple[str, dict]:
    """'int8qk c2 s4 bk64' -> ('int8qk', kwargs of mosaic_decode, plus 'halfsplits')."""
    pages, *words = name.split()
    if pages not in PAGES:
        raise ValueError(f"forms: a form starts with one of {sorted(PAGES)}, got {name!r}")
    kw: dict = {"quantized_qk": pages in ("int8qk", "fp8qk")}
    numbered = {"c": "consumers", "s": "stages", "bk": "block_kv", "pw": "producer_warps", "ps": "page_size",
                "cta": "ctas"}
    for w in words:
        prefix = w.rstrip("0123456789")
        if w in ("widener", "halfsplits"):
            kw[w] = True
        elif w == "persistent":
            kw["ctas"] = num_sms()
        elif w == "seqs":
            kw["order"] = "sequences"
        elif prefix in numbered and w[len(prefix):]:
            kw[numbered[prefix]] = int(w[len(prefix):])
        else:
            raise ValueError(f"forms: unknown word {w!r} in {name!r} (cN, sN, bkN, pwN, psN, widener, "
                             "halfsplits, ctaN, persistent, seqs)")
    return pages, kw


def problem(b: int, kv: int, hq: int, hkv: int, d: int, smoke: bool, ps: int = PS):
    key = jax.random.PRNGKey(b + kv)
    per_seq = kv // ps
    table = jax.random.permutation(jax.random.fold_in(key, 3), b * per_seq).astype(jnp.int32)
    # the same tokens at every page size: sequence-ordered pages put where the table says
    kp, vp = (jax.random.normal(jax.random.fold_in(key, i), (b * per_seq, ps, hkv, d), jnp.float32)
              .astype(jnp.bfloat16)[jnp.argsort(table)] for i in (0, 1))
    table = table.reshape(b, per_seq)
    q = jax.random.normal(jax.random.fold_in(key, 2), (b, hq, d), jnp.float32).astype(jnp.bfloat16)
    lens = jnp.full((b,), kv - (3 if smoke else 0), jnp.int32)  # smoke: a partial last page too
    caches = {}
    for name, dtype in PAGES.items():
        if dtype is None:
            caches[name] = (kp, vp, None, None)
        else:
            (k, ks), (v, vs) = jaxattn.quantize_kv(kp, dtype), jaxattn.quantize_kv(vp, dtype)
            caches[name] = (k, v, ks, vs)
    return q, table, lens, caches


def run_shape(b: int, kv: int, forms, rounds: int, calls: int, smoke: bool) -> list[dict]:
    """Every form at one shape (smoke: 8 q / 2 kv heads, head_dim 64, 64-token blocks, interpreted, one
    producer warp: the interpreter runs no per-warp code)."""
    hq, hkv, d = (8, 2, 64) if smoke else (HQ, HKV, D)
    problems = {}
    fns, outs = {}, {}
    for name in forms:
        pages, kw = parse_form(name)
        if smoke:
            kw["block_kv"], kw["producer_warps"] = 64, 1
        halve = kw.pop("halfsplits", False)
        ps = kw.pop("page_size", PS)
        if ps not in problems:  # the same draws for every page size: only the cache's layout differs
            problems[ps] = problem(b, kv, hq, hkv, d, smoke, ps)
        q, table, lens, caches = problems[ps]
        steps = -(-kv // kw.get("block_kv", 128))
        splits = 1 if smoke else one_wave_splits(b, hkv, steps, DECODE_CONFIG)
        splits = max(1, splits // 2) if halve else splits
        k, v, ks, vs = caches[pages]

        def f(q, k, v, lens, table, ks, vs, kw=kw, splits=splits):
            out, lse = mosaic_decode(q, k, v, lens, table, ks, vs, scale=q.shape[-1] ** -0.5, splits=splits,
                                     interpret=smoke, **kw)
            return merge_splits(out, lse)[0].astype(q.dtype)

        f = jax.jit(f)
        args = (q, k, v, lens, table, ks, vs)
        try:
            outs[name] = np.asarray(f(*args), np.float32)
            fns[name] = (f, args, splits, pages)
        except Exception as e:  # noqa: BLE001 - a form that does not fit or fails is reported, the rest run
            print(f"{b} x {kv} {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    times = {n: [] for n in fns}
    for _ in range(rounds):
        for n, (f, args, _, _) in fns.items():
            f(*args).block_until_ready()
            t0 = time.perf_counter()
            for _ in range(calls):
                out = f(*args)
            out.block_until_ready()
            times[n].append((time.perf_counter() - t0) / calls)
    first = {}
    for n, (_, _, _, pages) in fns.items():
        first.setdefault(pages, n)
    base = statistics.median(times[first["bf16"]]) if rounds and "bf16" in first else None
    rows = []
    for n, (_, _, splits, pages) in fns.items():
        med = statistics.median(times[n]) if rounds else float("nan")
        ref = outs[first[pages]]
        diff = float(np.linalg.norm(outs[n] - ref) / np.linalg.norm(ref))
        unq = outs.get(first.get("bf16"))
        unq = None if unq is None else float(np.linalg.norm(outs[n] - unq) / np.linalg.norm(unq))
        row = dict(shape=f"{b}x{kv}", form=n, splits=splits, median_us=med * 1e6,
                   rounds_us=[t * 1e6 for t in times[n]], vs_bf16=base / med if base else None, diff=diff,
                   unquantized_diff=unq)
        rows.append(row)
        timing = (f"{row['median_us']:8.1f} us" + (f" x{row['vs_bf16']:5.2f} bf16" if base else "")
                  + f"  rounds {' '.join(f'{t:.0f}' for t in row['rounds_us'])}") if rounds else "(not timed)"
        print(f"{b:3d} x {kv:6d} splits={splits:2d} {n:24s} {timing}  diff vs {first[pages]!r} {diff:.1e}"
              + (f" unq {unq:.1e}" if unq is not None else ""),
              flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="32x8192,64x4096,1x131072", help="batch x kv_len, comma-separated")
    ap.add_argument("--forms", default=None, help=f"comma-separated forms (default: {', '.join(DEFAULT_FORMS)})")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the Mosaic GPU interpreter (CPU)")
    args = ap.parse_args()
    forms = tuple(f.strip() for f in args.forms.split(",")) if args.forms else DEFAULT_FORMS
    try:
        for name in forms:
            parse_form(name)
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.smoke:  # a check that every form runs and agrees, no timing
        shapes, args.rounds = [(2, 128)], 0
    rows = [row for b, kv in shapes for row in run_shape(b, kv, forms, args.rounds, args.calls, args.smoke)]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
