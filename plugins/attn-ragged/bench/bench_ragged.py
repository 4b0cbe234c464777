"""Benchmark of the attn-ragged kernels on one GPU (effective KV bandwidth, ragged vs separate).

Run on the device from the repository root:

    python3 plugins/attn-ragged/bench/bench_ragged.py [--tune] [--json OUT.json]
    python3 plugins/attn-ragged/bench/bench_ragged.py --sections quant   # bf16 vs int8 vs fp8 pages

JSON goes to `--json`, else to `$OUT/bench_ragged_<sections>.json` when `OUT` is set.

Shapes: 32 query heads, 8 kv heads, head_dim 128, bf16, pages of 16 tokens (plus a page
size sweep), shuffled page tables. Effective bandwidth = K and V bytes the call must read
(sum over sequences of kv_len * kv_heads * head_dim * 2 bytes * 2) / time. Peers on the
same data in dense form `[B, S, Hkv, D]`: jax.nn.dot_product_attention(implementation=
"cudnn") and jax's Pallas decode kernel (decode_attention.gqa). Every kernel output is
first compared with a float32 reference (relative error ||out - ref|| / ||ref||).
Timing: median of 5 repetitions of 20 back-to-back calls after 2 warm-up calls, wall
clock around block_until_ready (the method of bench/results/peers_H100_2026-11-22.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn_ragged.kernel import DECODE_CONFIG, RAGGED_CONFIG, KernelConfig, paged_attention_kernel

HQ, HKV, D = 32, 8, 128
DT = jnp.bfloat16
ROWS: list[dict] = []
SMOKE = False  # --smoke: tiny shapes in the Pallas interpreter on CPU (checks this script, not speed)


def timeit(f, *args, n=20, reps=5):
    if SMOKE:
        n, reps = 1, 1
    out = f(*args)
    jax.block_until_ready(out)
    out = f(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            out = f(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t) / n)
    return float(np.median(ts)), out


def rel_err(x, ref):
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    if not np.all(np.isfinite(x)):
        return float("inf")
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def make_cache(key, lengths, page_size, extra_pages=7):
    """Shuffled pages for sequences of `lengths`; returns pages, table, dense K/V [B, S, Hkv, D]."""
    b = len(lengths)
    pps = -(-max(lengths) // page_size)
    num_pages = b * pps + extra_pages
    kk, kv, kp = jax.random.split(key, 3)
    k_pages = jax.random.normal(kk, (num_pages, page_size, HKV, D), jnp.float32).astype(DT)
    v_pages = jax.random.normal(kv, (num_pages, page_size, HKV, D), jnp.float32).astype(DT)
    perm = np.asarray(jax.random.permutation(kp, num_pages))[: b * pps].reshape(b, pps)
    table = jnp.asarray(perm, jnp.int32)
    return k_pages, v_pages, table


def dense_kv(pages, table):
    b, pps = table.shape
    _, ps, h, d = pages.shape
    return pages[table].reshape(b, pps * ps, h, d)


@jax.jit
def reference(q, k, v, q_pos, kv_len):
    """float32 reference: q [B, n, Hq, D], k/v [B, S, Hkv, D], q_pos [B, n], kv_len [B] -> [B, n, Hq, D]."""
    g = HQ // HKV
    b, n = q.shape[:2]
    qf = q.astype(jnp.float32).reshape(b, n, HKV, g, D)
    s = jnp.einsum("bnhgd,bshd->bhgns", qf, k.astype(jnp.float32), precision="highest") / np.sqrt(D)
    j = jnp.arange(k.shape[1])
    ok = (j[None, None, :] <= q_pos[:, :, None]) & (j[None, None, :] < kv_len[:, None, None])
    s = jnp.where(ok[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bhgns,bshd->bnhgd", p, v.astype(jnp.float32), precision="highest")
    return out.reshape(b, n, HQ, D)


def kernel_fn(cfg, cu=False):
    """The kernel at `cfg`; None: `jaxattn.paged_attention` through the `ragged_paged` backend with
    no settings (what a user gets: the backend's own defaults, e.g. the Mosaic kernel for
    one-byte pages on Hopper)."""
    def f(q, kp, vp, lens, table, cu_q_lens=None, k_scale=None, v_scale=None):
        if cfg is None:
            return jaxattn.paged_attention(q, kp, vp, lens, table, cu_q_lens=cu_q_lens, scale=1 / np.sqrt(D),
                                           k_scale=k_scale, v_scale=v_scale, backend="ragged_paged")
        if cfg.mosaic:  # the Hopper decode kernel (mosaic_decode.py)
            from jaxattn_ragged.mosaic_decode import mosaic_paged_decode

            return mosaic_paged_decode(q, kp, vp, lens, table, scale=1 / np.sqrt(D), k_scale=k_scale,
                                       v_scale=v_scale, config=cfg)[0]
        out, _ = paged_attention_kernel(q, kp, vp, lens, table, cu_q_lens, scale=1 / np.sqrt(D), config=cfg,
                                        k_scale=k_scale, v_scale=v_scale, interpret=SMOKE)
        return out
    return jax.jit(f)


def record(section, shape, name, dt, byts, err, extra=""):
    tbs = byts / dt / 1e12 if byts else 0.0
    ROWS.append(dict(section=section, shape=shape, impl=name, us=dt * 1e6, tbs=tbs, err=err, extra=extra))
    print(f"{section:8s} {shape:34s} {name:44s} {dt * 1e6:9.1f} us {tbs:6.2f} TB/s err={err:.1e} {extra}",
          flush=True)


def fail(section, shape, name, e):
    msg = str(e).splitlines()[0][:200] if str(e) else ""
    ROWS.append(dict(section=section, shape=shape, impl=name, fail=f"{type(e).__name__}: {msg}"))
    print(f"{section:8s} {shape:34s} {name:44s} FAIL {type(e).__name__}: {msg}", flush=True)


def bench_decode(b, kv, page_size, configs, peers=True, section="decode"):
    key = jax.random.PRNGKey(b * 7 + kv)
    lengths = [kv] * b
    kp, vp, table = make_cache(key, lengths, page_size)
    q = jax.random.normal(jax.random.fold_in(key, 1), (b, HQ, D), jnp.float32).astype(DT)
    lens = jnp.asarray(lengths, jnp.int32)
    kd, vd = dense_kv(kp, table), dense_kv(vp, table)
    ref = reference(q[:, None], kd, vd, (lens - 1)[:, None], lens)[:, 0]
    byts = 2 * b * kv * HKV * D * 2
    shape = f"(b={b}, kv={kv}, ps={page_size})"
    for name, cfg in configs:
        try:
            dt, out = timeit(kernel_fn(cfg), q, kp, vp, lens, table)
            err = rel_err(out, ref) if ref is not None else float("nan")
            record(section, shape, name, dt, byts, err)
        except Exception as e:  # noqa: BLE001
            fail(section, shape, name, e)
    if not peers or SMOKE:
        return
    from jax.experimental.pallas.ops.gpu import decode_attention as dec
    fns = {
        "jax.nn cudnn (dense)": lambda q, k, v: jax.nn.dot_product_attention(
            q[:, None], k, v, implementation="cudnn")[:, 0],
        "jax pallas decode gqa (dense)": lambda q, k, v: dec.gqa(q, k, v, sm_scale=1 / np.sqrt(D)),
    }
    for name, fn in fns.items():
        try:
            dt, out = timeit(jax.jit(fn), q, kd, vd)
            err = rel_err(out, ref) if ref is not None else float("nan")
            record(section, shape, name, dt, byts, err)
        except Exception as e:  # noqa: BLE001
            fail(section, shape, name, e)


def bench_long(kv, configs):
    """Batch 1, one very long sequence: split-KV must fill the GPU."""
    key = jax.random.PRNGKey(11)
    page_size = 16
    kp, vp, table = make_cache(key, [kv], page_size)
    q = jax.random.normal(jax.random.fold_in(key, 1), (1, HQ, D), jnp.float32).astype(DT)
    lens = jnp.asarray([kv], jnp.int32)
    kd, vd = dense_kv(kp, table), dense_kv(vp, table)
    ref = reference(q[:, None], kd, vd, (lens - 1)[:, None], lens)[:, 0]
    byts = 2 * kv * HKV * D * 2
    shape = f"(b=1, kv={kv}, ps={page_size})"
    for name, cfg in configs:
        try:
            dt, out = timeit(kernel_fn(cfg), q, kp, vp, lens, table)
            record("long", shape, name, dt, byts, rel_err(out, ref))
        except Exception as e:  # noqa: BLE001
            fail("long", shape, name, e)
    if SMOKE:
        return
    from jax.experimental.pallas.ops.gpu import decode_attention as dec
    fns = {
        "jax.nn cudnn (dense)": lambda q, k, v: jax.nn.dot_product_attention(
            q[:, None], k, v, implementation="cudnn")[:, 0],
        "jax pallas decode gqa (dense, k_splits=16)": lambda q, k, v: dec.gqa(q, k, v, sm_scale=1 / np.sqrt(D)),
        "jax pallas decode gqa (dense, k_splits=64)": lambda q, k, v: dec.gqa(q, k, v, sm_scale=1 / np.sqrt(D),
                                                                              k_splits=64),
    }
    for name, fn in fns.items():
        try:
            dt, out = timeit(jax.jit(fn), q, kd, vd)
            record("long", shape, name, dt, byts, rel_err(out, ref))
        except Exception as e:  # noqa: BLE001
            fail("long", shape, name, e)


def ragged_problem(n_prefill=8, chunk=512, context=1536, n_decode=56, decode_kv=4096):
    """`n_prefill` chunks of `chunk` tokens (on `context` earlier tokens) + `n_decode` decode tokens:
    q, pages, table, lens, cu, the lengths, and `ref(kd, vd)`, the float32 reference on dense K/V."""
    key = jax.random.PRNGKey(5)
    pre_len = context + chunk
    lengths = [pre_len] * n_prefill + [decode_kv] * n_decode
    kp, vp, table = make_cache(key, lengths, 16)
    q_counts = [chunk] * n_prefill + [1] * n_decode
    cu_np = np.concatenate([[0], np.cumsum(q_counts)]).astype(np.int32)
    tokens = int(cu_np[-1])
    q = jax.random.normal(jax.random.fold_in(key, 1), (tokens, HQ, D), jnp.float32).astype(DT)
    lens = jnp.asarray(lengths, jnp.int32)
    n_pre_tok = n_prefill * chunk
    pos_pre = jnp.broadcast_to(jnp.arange(context, pre_len)[None], (n_prefill, chunk))

    def ref(kd, vd):
        ref_pre = reference(q[:n_pre_tok].reshape(n_prefill, chunk, HQ, D), kd[:n_prefill], vd[:n_prefill],
                            pos_pre, lens[:n_prefill]).reshape(n_pre_tok, HQ, D)
        ref_dec = reference(q[n_pre_tok:, None], kd[n_prefill:], vd[n_prefill:], (lens[n_prefill:] - 1)[:, None],
                            lens[n_prefill:])[:, 0]
        return jnp.concatenate([ref_pre, ref_dec])
    return q, kp, vp, table, lens, jnp.asarray(cu_np), lengths, ref


def bench_ragged(configs, decode_cfg, n_prefill=8, chunk=512, context=1536, n_decode=56, decode_kv=4096):
    """8 prefill chunks of 512 tokens (on `context` earlier tokens) + 56 decode tokens."""
    q, kp, vp, table, lens, cu, lengths, ref_fn = ragged_problem(n_prefill, chunk, context, n_decode, decode_kv)
    ref = ref_fn(dense_kv(kp, table), dense_kv(vp, table))
    n_pre_tok = n_prefill * chunk
    byts = sum(2 * n * HKV * D * 2 for n in lengths)
    shape = f"({n_prefill}x{chunk} prefill + {n_decode} decode)"
    # separate calls: the prefill sequences (ragged) and the decode sequences (decode layout)
    q_pre, q_dec = q[:n_pre_tok], q[n_pre_tok:]
    lens_pre, lens_dec = lens[:n_prefill], lens[n_prefill:]
    t_pre, t_dec = table[:n_prefill], table[n_prefill:]
    cu_pre = cu[: n_prefill + 1]
    best_one = None
    for name, cfg in configs:
        try:
            f = kernel_fn(cfg)
            dt, out = timeit(f, q, kp, vp, lens, table, cu)
            record("ragged", shape, f"one call: {name}", dt, byts, rel_err(out, ref))
            best_one = dt if best_one is None else min(best_one, dt)
            f_dec = kernel_fn(decode_cfg)

            def separate(q_pre, q_dec, kp, vp, f=f, f_dec=f_dec):
                a = f(q_pre, kp, vp, lens_pre, t_pre, cu_pre)
                b = f_dec(q_dec, kp, vp, lens_dec, t_dec)
                return a, b
            dt2, (a, b) = timeit(separate, q_pre, q_dec, kp, vp)
            err2 = rel_err(jnp.concatenate([a, b]), ref)
            record("ragged", shape, f"separate (prefill call + decode call): {name}", dt2, byts, err2,
                   f"one/separate = {dt / dt2:.2f}")
        except Exception as e:  # noqa: BLE001
            fail("ragged", shape, name, e)
            traceback.print_exc()


# -- quantized cache: bf16 vs int8 vs fp8 pages ------------------------------------------------

QUANT_DTYPES = ("bfloat16", "int8", "float8_e4m3fn")
QUANT_BAR = 1.7  # int8 and fp8 decode must reach this multiple of the bf16 cache's tokens/s
QUANT_VARIANTS = {"bk64": dict(block_kv=64), "bk256": dict(block_kv=256), "w8": dict(num_warps=8),
                  "s4": dict(num_stages=4), "s2": dict(num_stages=2)}
INT8_DOTS = {"int8 qk": dict(int8_dots=1), "int8 qk+pv": dict(int8_dots=2)}  # int8 pages only
MOSAIC = {"mosaic": dict(mosaic=1), "mosaic int8 qk": dict(mosaic=1, int8_dots=1),  # decode; bf16 and int8 pages
          "mosaic s2": dict(mosaic=1, num_stages=2), "mosaic bk64": dict(mosaic=1, block_kv=64),
          # two consumer warpgroups (an even number of stages): fp8 pages' best, int8's with int8 products
          "mosaic2 s4 bk64": dict(mosaic=2, num_stages=4, block_kv=64),
          "mosaic2 int8 qk s4": dict(mosaic=2, int8_dots=1, num_stages=4)}
BACKEND_DEFAULT = "paged_attention (backend default)"  # the bars: what a user gets with no settings


def quantized(kp, vp, dtype):
    """Pages in `dtype` with their per token and head scales (bf16: the pages, no scales)."""
    if dtype == "bfloat16":
        return kp, vp, (None, None)
    k, ks = jaxattn.quantize_kv(kp, dtype)
    v, vs = jaxattn.quantize_kv(vp, dtype)
    return k, v, (ks, vs)


def dequantized_dense(pages, scale, table):
    return dense_kv(pages if scale is None else jaxattn.dequantize_kv(pages, scale), table)


def cache_bytes(tokens, dtype):
    """K and V bytes read for `tokens` cached tokens: the values, and a float32 scale per token and head."""
    per_head = 2 * D if dtype == "bfloat16" else D + 4
    return 2 * tokens * HKV * per_head


def record_quant(section, shape, dtype, name, dt, tokens, byts, err, err_deq):
    ROWS.append(dict(section=section, shape=shape, dtype=dtype, impl=name, us=dt * 1e6, tokens_per_s=tokens / dt,
                     tbs=byts / dt / 1e12, err=err, err_vs_dequantized=err_deq))
    print(f"{section:7s} {shape:34s} {dtype:14s} {name:30s} {dt * 1e6:8.1f} us {tokens / dt:11.0f} tok/s "
          f"{byts / dt / 1e12:5.2f} TB/s err={err:.1e} (vs dequantized {err_deq:.1e})", flush=True)


def quant_cases(section, shape, tokens, q, kp, vp, table, lens, cu, ref_of, configs):
    """Time every dtype x config on one problem; `ref_of(kd, vd)` is the float32 reference on dense K/V."""
    ref = ref_of(dense_kv(kp, table), dense_kv(vp, table))
    byts_of = {dt: cache_bytes(int(jnp.sum(lens)), dt) for dt in QUANT_DTYPES}
    times = {}
    for dtype in QUANT_DTYPES:
        k, v, (ks, vs) = quantized(kp, vp, dtype)
        deq = ref if ks is None else ref_of(dequantized_dense(k, ks, table), dequantized_dense(v, vs, table))
        for name, cfg in configs:
            if cfg is not None and cfg.int8_dots and dtype != "int8":
                continue
            try:
                dt, out = timeit(kernel_fn(cfg), q, k, v, lens, table, cu, ks, vs)
                record_quant(section, shape, dtype, name, dt, tokens, byts_of[dtype], rel_err(out, ref),
                             rel_err(out, deq))
                times[(dtype, name)] = dt
            except Exception as e:  # noqa: BLE001
                fail(section, shape, f"{dtype} {name}", e)
        del k, v, ks, vs, deq
    return ref, times


def quant_bars(section, shape, times, default, bar=QUANT_BAR):
    """tokens/s of int8 and fp8 pages over bf16 pages (default configs, and each dtype's best), judged
    against `bar` (None: reported only)."""
    for dtype in QUANT_DTYPES[1:]:
        if (dtype, default) not in times or ("bfloat16", default) not in times:
            continue
        ratio = times[("bfloat16", default)] / times[(dtype, default)]
        best_name = min((n for d, n in times if d == dtype), key=lambda n: times[(dtype, n)])
        best = min(t for (d, _), t in times.items() if d == "bfloat16") / times[(dtype, best_name)]
        ok = None if bar is None else ratio >= bar
        ROWS.append(dict(section=section + "-bar", shape=shape, dtype=dtype, speedup_vs_bf16=ratio,
                         best_config=best_name, best_speedup_vs_best_bf16=best, bar=bar, ok=ok))
        print(f"BAR     {shape:34s} {dtype:14s} tokens/s vs bf16 pages: {ratio:.2f}x ({_verdict(bar, ok)}); "
              f"best {best_name}: {best:.2f}x the best bf16", flush=True)


def _verdict(bar, ok):
    return "no bar" if bar is None else f"bar {bar}x: {'pass' if ok else 'FAIL'}"


def bench_quant(tune=False, final=False, page_size=16):
    """Decode (32 x 8192, 64 x 4096, 1 x 131072) and a ragged mix, bf16 vs int8 vs fp8 pages (32 q / 8 kv
    heads, head_dim 128, pages of `page_size` for decode, 16 for the mix), beside cuDNN on a dense
    bf16 cache. `final`: only the backend's default, the Triton kernel's, its int8 products and the
    Mosaic kernel at 2 stages (bf16's best) for decode. Larger pages ask whether one-byte decode is
    bound by its copies: the Mosaic kernel issues one TMA copy per page, kv head and K or V, and a
    page of 16 one-byte tokens is 2 KB."""
    default = BACKEND_DEFAULT
    shapes = [(2, 64), (2, 32), (1, 256)] if SMOKE else [(32, 8192), (64, 4096), (1, 131072)]
    for i, (b, kv) in enumerate(shapes):
        key = jax.random.PRNGKey(b * 7 + kv)
        kp, vp, table = make_cache(key, [kv] * b, page_size)
        q = jax.random.normal(jax.random.fold_in(key, 1), (b, HQ, D), jnp.float32).astype(DT)
        lens = jnp.asarray([kv] * b, jnp.int32)
        shape = f"decode (b={b}, kv={kv}, ps={page_size})"
        variants = {"": {}, **INT8_DOTS, **({} if SMOKE else MOSAIC),
                    **(QUANT_VARIANTS if (tune or i == 0) and not SMOKE else {})}
        if final:
            variants = {"": {}, "int8 qk": INT8_DOTS["int8 qk"],
                        **({} if SMOKE else {"mosaic s2": MOSAIC["mosaic s2"]})}
        ref, times = quant_cases("quant", shape, b, q, kp, vp, table, lens, None,
                                 lambda kd, vd, q=q, lens=lens: reference(q[:, None], kd, vd, (lens - 1)[:, None],
                                                                          lens)[:, 0],
                                 cfgs(DECODE_CONFIG, variants, backend_default=not SMOKE))
        if not SMOKE:
            kd, vd = dense_kv(kp, table), dense_kv(vp, table)
            try:
                fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q[:, None], k, v, implementation="cudnn"))
                dt, out = timeit(fn, q, kd, vd)
                record_quant("quant", shape, "bfloat16 dense", "jax.nn cudnn", dt, b, cache_bytes(b * kv, "bfloat16"),
                             rel_err(out[:, 0], ref), 0.0)
            except Exception as e:  # noqa: BLE001
                fail("quant", shape, "jax.nn cudnn (dense)", e)
            del kd, vd
        quant_bars("quant", shape, times, default)
        del kp, vp
    args = dict(n_prefill=2, chunk=32, context=16, n_decode=3, decode_kv=64) if SMOKE else {}
    q, kp, vp, table, lens, cu, _, ref_of = ragged_problem(**args)
    shape = "ragged ({}x{} prefill + {} decode)".format(*((2, 32, 3) if SMOKE else (8, 512, 56)))
    variants = {"": {}, **INT8_DOTS, **({"bq16": dict(block_q=16), "w8": dict(num_warps=8)} if tune else {})}
    _, times = quant_cases("quant", shape, int(q.shape[0]), q, kp, vp, table, lens, cu, ref_of,
                           cfgs(RAGGED_CONFIG, variants, backend_default=not SMOKE))
    quant_bars("quant", shape, times, default, bar=None)  # the bar is for decode; prefill is not bound by the cache
    print("\nQUANT SUMMARY (tokens/s: decode tokens, or query tokens of the ragged call)")
    for r in ROWS:
        if "tokens_per_s" in r:
            print(f"{r['shape']:34s} {r['dtype']:14s} {r['impl']:30s} {r['us']:8.1f}us {r['tokens_per_s']:11.0f} "
                  f"tok/s {r['tbs']:5.2f}TB/s err={r['err']:.1e}")
        elif "speedup_vs_bf16" in r:
            print(f"{r['shape']:34s} {r['dtype']:14s} {r['speedup_vs_bf16']:.2f}x bf16 ({_verdict(r['bar'], r['ok'])}; "
                  f"best {r['best_config']} {r['best_speedup_vs_best_bf16']:.2f}x)")


def cfgs(base: KernelConfig, variants: dict[str, dict], backend_default: bool = False):
    """(name, config) of each variant over `base`, after the backend's own default (config None)."""
    out = [(BACKEND_DEFAULT, None)] if backend_default else []
    for name, ch in variants.items():
        c = base.replace(**ch)
        out.append((f"ragged_paged {name}" if name else "ragged_paged (default)", c))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true", help="time several block/warp/stage/split variants")
    ap.add_argument("--final", action="store_true", help="defaults plus the few variants BENCHMARKS.md cites")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sections", default="decode,long,ragged,pages",
                    help="comma-separated: decode, long, ragged, pages, quant (bf16 vs int8 vs fp8 pages)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, Pallas interpreter (CPU check)")
    ap.add_argument("--page-size", type=int, default=16, help="the quant section's decode pages (default 16)")
    args = ap.parse_args()
    global SMOKE
    SMOKE = args.smoke
    sz = (lambda x: max(16, x // 256)) if SMOKE else (lambda x: x)
    print("jax", jax.__version__, jax.devices(), flush=True)
    sections = args.sections.split(",")
    dec_var = {"": {}}
    if args.tune:
        dec_var.update({
            "gather3d (reshape)": dict(gather2d=0), "no mask split": dict(mask_split=0),
            "bk64": dict(block_kv=64), "bk64 s4": dict(block_kv=64, num_stages=4),
            "s4": dict(num_stages=4), "s2": dict(num_stages=2), "w8": dict(num_warps=8),
            "splits=1": dict(num_splits=1), "tp=8/SM": dict(target_programs=8 * 132),
        })
    if args.final:
        dec_var.update({"splits=1": dict(num_splits=1), "splits=3": dict(num_splits=3)})
    if "decode" in sections:
        for b, kv in [(32, 8192), (64, 4096)]:
            bench_decode(b if not SMOKE else 2, sz(kv), 16, cfgs(DECODE_CONFIG, dec_var))
    if "long" in sections:
        long_var = {"": {}}
        if args.final:
            long_var.update({"splits=64": dict(num_splits=64)})
        if args.tune:
            long_var.update({"splits=32": dict(num_splits=32), "splits=128": dict(num_splits=128),
                             "bk64": dict(block_kv=64), "bk64 splits=32": dict(block_kv=64, num_splits=32),
                             "gather3d": dict(gather2d=0)})
        bench_long(sz(131072), cfgs(DECODE_CONFIG, long_var))
    if "pages" in sections:
        for ps in (64, 256):
            b, kv = (2, 512) if SMOKE else (32, 8192)
            bench_decode(b, kv, ps, cfgs(DECODE_CONFIG, {"": {}}), peers=False, section="pagesize")
    if "ragged" in sections:
        rag_var = {"": {}}
        if args.final:
            rag_var.update({"one tile size": dict(two_tiles=0), "bq16": dict(block_q=16)})
        if args.tune:
            rag_var.update({"bq32": dict(block_q=32), "bq32 w8": dict(block_q=32, num_warps=8),
                            "bq32 bk128 w8": dict(block_q=32, block_kv=128, num_warps=8),
                            "bq32 s2": dict(block_q=32, num_stages=2),
                            "one tile size (old)": dict(two_tiles=0), "no mask split": dict(mask_split=0),
                            "gather3d": dict(gather2d=0)})
        if SMOKE:
            bench_ragged(cfgs(RAGGED_CONFIG, rag_var), DECODE_CONFIG, n_prefill=2, chunk=32, context=16, n_decode=3,
                         decode_kv=64)
        else:
            bench_ragged(cfgs(RAGGED_CONFIG, rag_var), DECODE_CONFIG)
    if "quant" in sections:
        bench_quant(tune=args.tune, final=args.final, page_size=args.page_size)
    if args.json is None and os.environ.get("OUT"):
        args.json = os.path.join(os.environ["OUT"], f"bench_ragged_{'_'.join(sections)}.json")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0].device_kind), rows=ROWS), fh, indent=1)
    print("\nSUMMARY")
    for r in ROWS:
        if "tokens_per_s" in r or "speedup_vs_bf16" in r:
            continue  # the quant section prints its own summary
        if "fail" in r:
            print(f"{r['section']:8s} {r['shape']:34s} {r['impl']:44s} FAIL")
        else:
            print(f"{r['section']:8s} {r['shape']:34s} {r['impl']:44s} {r['us']:8.1f}us {r['tbs']:5.2f}TB/s "
                  f"err={r['err']:.1e} {r['extra']}")


if __name__ == "__main__":
    sys.exit(main())
