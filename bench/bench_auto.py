"""What `backend="auto"` chooses and reaches on this device, on the peers' shapes.

Run on the GPU machine with the core and every plugin installed:

    python3 bench/bench_auto.py > auto.md

For each shape of bench/results/peers_H100_2026-11-22.md (bf16) it prints the backend `auto` picks
for training (forward+backward) and for inference (forward only), and in one run the TFLOP/s
of auto, of every jaxattn backend forced, of jax.nn.dot_product_attention(implementation=
"cudnn") and of tokamax's default dot_product_attention (where tokamax imports), with the two
ratios issue 16's bars name: auto / the fastest backend, auto / tokamax; then
rows with a feature (soft-cap, which cuDNN lacks; a 1024 window at 16k) to show what
`auto` picks there, a chain of 32 short causal calls in one jit, each with its own keys and
values (the per-call cost of the value guards), and paged decode (bandwidth beside cudnn on the same data made dense).
Method: jaxattn.bench.time_side_by_side: each column the median of 5 x ROUNDS samples of 10
calls after 2 warm-ups, the samples taken in turn from every column of the row, the order
rotated each cycle (until 2026-12-03: each column's best of ROUNDS whole-column rounds, every
other round reversed, which gave the same program 5-13% apart in two columns of one run: the
first and last columns open every round; that is the size of the gaps the bars judge).
`python3 bench/bench_auto.py 1` for 5 cycles. Where auto compiles
to the very program of the backend it picked (`jaxattn.bench.same_program`), the row marks the
pick with `=` and both columns show the better of the two timings of that program.
"""

from __future__ import annotations

import datetime
import functools
import sys

import jax
import jax.numpy as jnp

import jaxattn
from jaxattn.bench import attention_flops, same_program, time_call, time_side_by_side

SHAPES = [  # (batch, seq, q heads, kv heads, head_dim)
    (4, 4096, 32, 32, 128),
    (4, 4096, 32, 8, 128),
    (1, 16384, 16, 16, 128),
    (8, 2048, 16, 16, 64),
]


def inputs(b, s, hq, hkv, d):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (b, s, hq, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.bfloat16)
    return q, k, v


def tflops(seconds, shape, causal, factor):
    b, s, hq, _, d = shape
    return attention_flops(b, s, s, hq, d, causal) * factor / seconds / 1e12


def cudnn_direct(q, k, v, causal):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


def tokamax_default():
    """tokamax's `dot_product_attention` with its own choice of implementation, or None where
    tokamax cannot be imported (it needs jax >= 0.11.1)."""
    try:
        import tokamax
    except Exception as err:  # noqa: BLE001 - a missing peer is a column of "-", not the end
        print(f"<!-- tokamax not importable: {type(err).__name__}: {err} -->")
        return None
    return lambda q, k, v, causal: tokamax.dot_product_attention(q, k, v, is_causal=causal)


BACKENDS = ("cudnn", "flash")  # the jaxattn backends that serve these shapes on a GPU


ROUNDS = 3


def row(shape, causal: bool, tokamax_fn) -> str:
    """One table row: auto's choice and TFLOP/s beside every jaxattn backend and the peers, in one
    run, for the forward and for forward+backward; then auto / best backend and auto / tokamax."""
    q, k, v = inputs(*shape)
    modes = {"fwd": jaxattn.OperationMetadata(mode="prefill"), "train": jaxattn.OperationMetadata(mode="train")}
    callers = {"auto": lambda mode: lambda q, k, v: jaxattn.attention(q, k, v, is_causal=causal, metadata=modes[mode])}
    for name in BACKENDS:
        callers[name] = lambda mode, name=name: lambda q, k, v: jaxattn.attention(
            q, k, v, is_causal=causal, backend=name, metadata=modes[mode])
    callers["jax.nn cudnn"] = lambda mode: lambda q, k, v: cudnn_direct(q, k, v, causal)
    if tokamax_fn is not None:
        callers["tokamax"] = lambda mode: lambda q, k, v: tokamax_fn(q, k, v, causal)

    cells, figures, twins = [], {}, {}
    for mode, factor in (("fwd", 1.0), ("train", 3.5)):
        compiled = {}
        for name, make in callers.items():
            fn = make(mode)
            if mode == "fwd":
                compiled[name] = jax.jit(fn)
            else:
                compiled[name] = jax.jit(jax.grad(lambda q, k, v, fn=fn: fn(q, k, v).astype(jnp.float32).sum(),
                                                  argnums=(0, 1, 2)))
        seconds, failed = time_side_by_side({n: functools.partial(f, q, k, v) for n, f in compiled.items()},
                                            repeats=5 * ROUNDS)
        # where auto compiled to a backend's very program, the two columns timed it twice: both
        # show the better of the two (their gap is the run's noise), and the row says so
        twin = next((n for n in BACKENDS if n not in failed and "auto" not in failed
                     and same_program(compiled["auto"], compiled[n], q, k, v)), None)
        if twin is not None:
            seconds["auto"] = seconds[twin] = min(seconds["auto"], seconds[twin])
            twins[mode] = twin
        for name in callers:
            if name in failed:
                cells.append(f"fails ({failed[name]})")
            else:
                figures[mode, name] = tflops(seconds[name], shape, causal, factor)
                cells.append(f"{figures[mode, name]:.0f}")
        auto = figures.get((mode, "auto"), 0.0)
        best = max((figures.get((mode, n), 0.0) for n in BACKENDS), default=0.0)
        cells.append(f"{auto / best:.2f}" if best else "-")
        peer = figures.get((mode, "tokamax"))
        cells.append(f"{auto / peer:.2f}" if peer else "-")
    choices = [jaxattn.select(q, k, v, is_causal=causal, metadata=modes[m]).name + ("=" if m in twins else "")
               for m in ("fwd", "train")]
    return f"| {shape} | {'yes' if causal else 'no'} | {choices[0]} / {choices[1]} | " + " | ".join(cells) + " |"


def feature_row(label: str, shape, **kwargs) -> str:
    """auto on a causal request with a feature: which backend, and its TFLOP/s (visible keys only)."""
    q, k, v = inputs(*shape)
    train = jaxattn.OperationMetadata(mode="train")
    infer = jaxattn.OperationMetadata(mode="prefill")
    fwd = jax.jit(lambda q, k, v: jaxattn.attention(q, k, v, is_causal=True, metadata=infer, **kwargs))
    grad = jax.jit(jax.grad(lambda q, k, v: jaxattn.attention(q, k, v, is_causal=True, metadata=train, **kwargs)
                            .astype(jnp.float32).sum(), argnums=(0, 1, 2)))
    seconds = [time_call(functools.partial(f, q, k, v)) for f in (fwd, grad)]
    choice = jaxattn.select(q, k, v, is_causal=True, metadata=train, **kwargs).name
    window = kwargs.get("sliding_window")
    b, s, hq, _, d = shape
    # visible keys per query: a causal band of `window + 1` keys (minus the first rows' shortfall)
    flops = (4.0 * b * hq * d * sum(min(i, window) + 1 for i in range(s)) if window
             else attention_flops(b, s, s, hq, d, True))
    return (f"| {label} {shape} | {choice} | {seconds[0] * 1e3:.3f} ms, {flops / seconds[0] / 1e12:.0f} TFLOP/s | "
            f"{seconds[1] * 1e3:.3f} ms, {3.5 * flops / seconds[1] / 1e12:.0f} TFLOP/s |")


def decode_row(batch: int, kv_len: int, page_size: int = 16) -> str:
    """auto on paged decode (32 q / 8 kv heads, head_dim 128) beside cudnn on the dense cache."""
    hq, hkv, d = 32, 8, 128
    pages_per_seq = kv_len // page_size
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    q = jax.random.normal(ks[0], (batch, hq, d), jnp.bfloat16)
    k_pages = jax.random.normal(ks[1], (batch * pages_per_seq, page_size, hkv, d), jnp.bfloat16)
    v_pages = jax.random.normal(ks[2], (batch * pages_per_seq, page_size, hkv, d), jnp.bfloat16)
    table = jax.random.permutation(ks[3], batch * pages_per_seq).reshape(batch, pages_per_seq).astype(jnp.int32)
    lengths = jnp.full((batch,), kv_len, jnp.int32)
    paged = jax.jit(lambda q, kp, vp, n, t: jaxattn.paged_attention(q, kp, vp, n, t))
    k_dense = k_pages[table].reshape(batch, kv_len, hkv, d)
    v_dense = v_pages[table].reshape(batch, kv_len, hkv, d)
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q[:, None], k, v, implementation="cudnn"))
    t_ours = time_call(functools.partial(paged, q, k_pages, v_pages, lengths, table))
    t_peer = time_call(functools.partial(dense, q, k_dense, v_dense))
    choice = jaxattn.select(q, k_pages, v_pages, lengths, table, op="paged_attention").name
    nbytes = 2 * batch * kv_len * hkv * d * 2
    return (f"| ({batch}, {kv_len}), pages of {page_size} | {choice} | {nbytes / t_ours / 1e12:.2f} TB/s "
            f"({t_ours * 1e6:.0f} µs) | {nbytes / t_peer / 1e12:.2f} TB/s ({t_peer * 1e6:.0f} µs) |")


def layers_row(layers: int = 32, shape=(1, 512, 32, 8, 128)) -> str:
    """`layers` causal forward calls in a chain (each call's output is the next one's query, each
    layer its own keys and values, as in a model), in one jit: the per-call costs a single large
    call hides (a value guard's read of the values, a `lax.cond` whose predicate XLA reads back to
    the host) show here, beside jax.nn cuDNN's chain."""
    q, _, _ = inputs(*shape)
    b, s, _, hkv, d = shape
    ks = jax.random.split(jax.random.PRNGKey(7), 2)
    keys, values = (jax.random.normal(key, (layers, b, s, hkv, d), jnp.bfloat16) for key in ks)
    infer = jaxattn.OperationMetadata(mode="prefill")

    def chain(attend):
        def run(q, keys, values):
            for i in range(layers):
                q = attend(q, keys[i], values[i])
            return q
        return jax.jit(run)

    ours = chain(lambda q, k, v: jaxattn.attention(q, k, v, is_causal=True, metadata=infer))
    forced = chain(lambda q, k, v: jaxattn.attention(q, k, v, is_causal=True, backend="cudnn", metadata=infer))
    peer = chain(lambda q, k, v: cudnn_direct(q, k, v, True))
    cells = [f"{time_call(functools.partial(f, q, keys, values)) * 1e6 / layers:.1f} µs"
             for f in (ours, forced, peer)]
    choice = jaxattn.select(q, keys[0], values[0], is_causal=True, metadata=infer).name
    return f"| {layers} × {shape} | {choice} | " + " | ".join(cells) + " |"


def main() -> None:
    global ROUNDS
    if len(sys.argv) > 1:
        ROUNDS = int(sys.argv[1])
    hw = jaxattn.hardware.current()
    print(f"# auto on {hw.device_kind}, jax {jax.__version__}, {datetime.date.today()}\n")
    tokamax_fn = tokamax_default()
    names = ["auto", *BACKENDS, "jax.nn cudnn", *(["tokamax"] if tokamax_fn is not None else [])]
    columns = [f"{kind} {n}" for kind in ("fwd", "fwd+bwd")
               for n in (*names, "auto / best backend", "auto / tokamax")]
    print(f"TFLOP/s, each the median of {5 * ROUNDS} samples taken in turn; auto picks: forward-only / differentiated "
          "(`=`: auto compiled to that backend's very program; both columns show the better of their two timings)."
          "\n")
    print("| shape (b, s, hq, hkv, d) | causal | auto picks | " + " | ".join(columns) + " |")
    print("|" + "---|" * (3 + len(columns)))
    for shape in SHAPES:
        for causal in (False, True):
            print(row(shape, causal, tokamax_fn))
            sys.stdout.flush()
    print("\n| causal, with a feature (b, s, hq, hkv, d) | auto picks | fwd | fwd+bwd |")
    print("|---|---|---|---|")
    for label, shape, kwargs in (("soft-cap 30", (4, 4096, 32, 8, 128), {"logits_soft_cap": 30.0}),
                                 ("window 1024", (1, 16384, 16, 16, 128),
                                  {"sliding_window": 1024})):
        try:
            print(feature_row(label, shape, **kwargs))
        except Exception as err:  # noqa: BLE001
            print(f"| {label} {shape} | fails: {type(err).__name__}: {err} | | |")
        sys.stdout.flush()
    print("\n| chained causal forward calls, per call | auto picks | auto | cudnn via jaxattn | jax.nn cudnn |")
    print("|---|---|---|---|---|")
    try:
        print(layers_row())
    except Exception as err:  # noqa: BLE001
        print(f"| chained calls | fails: {type(err).__name__}: {err} | | | |")
    sys.stdout.flush()
    print("\n| paged decode (batch, kv_len) | auto picks | auto | jax.nn cudnn on the dense cache |")
    print("|---|---|---|---|")
    for batch, kv_len in ((32, 8192), (64, 4096)):
        try:
            print(decode_row(batch, kv_len))
        except Exception as err:  # noqa: BLE001
            print(f"| ({batch}, {kv_len}) | fails: {type(err).__name__}: {err} | | |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
