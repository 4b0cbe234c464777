"""Benchmark of the attn-ragged kernels on one GPU (effective KV bandwidth, ragged vs separate).

Run on the device from the repository root:

    python3 plugins/attn-ragged/bench/bench_ragged.py [--tune] [--json OUT.json]

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
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

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
    def f(q, kp, vp, lens, table, cu_q_lens=None):
        out, _ = paged_attention_kernel(q, kp, vp, lens, table, cu_q_lens, scale=1 / np.sqrt(D), config=cfg,
                                        interpret=SMOKE)
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


def bench_ragged(configs, decode_cfg, n_prefill=8, chunk=512, context=1536, n_decode=56, decode_kv=4096):
    """8 prefill chunks of 512 tokens (on `context` earlier tokens) + 56 decode tokens."""
    page_size = 16
    key = jax.random.PRNGKey(5)
    pre_len = context + chunk
    lengths = [pre_len] * n_prefill + [decode_kv] * n_decode
    kp, vp, table = make_cache(key, lengths, page_size)
    q_counts = [chunk] * n_prefill + [1] * n_decode
    cu_np = np.concatenate([[0], np.cumsum(q_counts)]).astype(np.int32)
    tokens = int(cu_np[-1])
    q = jax.random.normal(jax.random.fold_in(key, 1), (tokens, HQ, D), jnp.float32).astype(DT)
    lens = jnp.asarray(lengths, jnp.int32)
    cu = jnp.asarray(cu_np)
    kd, vd = dense_kv(kp, table), dense_kv(vp, table)
    n_pre_tok = n_prefill * chunk
    pos_pre = jnp.broadcast_to(jnp.arange(context, pre_len)[None], (n_prefill, chunk))
    ref_pre = reference(q[:n_pre_tok].reshape(n_prefill, chunk, HQ, D), kd[:n_prefill], vd[:n_prefill],
                        pos_pre, lens[:n_prefill]).reshape(n_pre_tok, HQ, D)
    ref_dec = reference(q[n_pre_tok:, None], kd[n_prefill:], vd[n_prefill:], (lens[n_prefill:] - 1)[:, None],
                        lens[n_prefill:])[:, 0]
    ref = jnp.concatenate([ref_pre, ref_dec])
    del kd, vd
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


def cfgs(base: KernelConfig, variants: dict[str, dict]) -> list[tuple[str, KernelConfig]]:
    out = []
    for name, ch in variants.items():
        c = base.replace(**ch)
        out.append((f"ragged_paged {name}" if name else "ragged_paged (default)", c))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true", help="time several block/warp/stage/split variants")
    ap.add_argument("--final", action="store_true", help="defaults plus the few variants BENCHMARKS.md cites")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sections", default="decode,long,ragged,pages")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, Pallas interpreter (CPU check)")
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
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0].device_kind), rows=ROWS), fh, indent=1)
    print("\nSUMMARY")
    for r in ROWS:
        if "fail" in r:
            print(f"{r['section']:8s} {r['shape']:34s} {r['impl']:44s} FAIL")
        else:
            print(f"{r['section']:8s} {r['shape']:34s} {r['impl']:44s} {r['us']:8.1f}us {r['tbs']:5.2f}TB/s "
                  f"err={r['err']:.1e} {r['extra']}")


if __name__ == "__main__":
    sys.exit(main())
