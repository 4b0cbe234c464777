"""`jaxattn.bench.same_program`: what lets a benchmark say that two of its columns timed one program;
`time_side_by_side`: columns timed in turn, so none owns the first slot."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxattn
import jaxattn.bench
from jaxattn.bench import lowered_text, program_text, same_program, time_side_by_side


def _inputs():
    ks = jax.random.split(jax.random.PRNGKey(7), 3)
    return [jax.random.normal(x, (1, 64, 4, 16), jnp.float32) for x in ks]


def _call(**kwargs):
    md = jaxattn.OperationMetadata(mode="prefill")
    return jax.jit(lambda q, k, v: jaxattn.attention(q, k, v, metadata=md, **kwargs))


def test_auto_and_the_backend_it_picks_are_one_program():
    q, k, v = _inputs()
    assert jaxattn.select(q, k, v, is_causal=True, metadata=jaxattn.OperationMetadata(mode="prefill")).name == "xla"
    # two lambdas on different source lines: only their metadata and location tables differ
    assert same_program(_call(is_causal=True), _call(is_causal=True, backend="xla"), q, k, v)
    text = program_text(_call(is_causal=True), q, k, v)
    assert "ENTRY" in text and "metadata=" not in text and "StackFrames" not in text


def test_other_masks_scales_and_call_kinds_are_other_programs():
    q, k, v = _inputs()
    causal = _call(is_causal=True, backend="xla")
    assert not same_program(causal, _call(is_causal=False, backend="xla"), q, k, v)
    assert not same_program(causal, _call(is_causal=True, backend="xla", scale=0.5), q, k, v)
    grad = jax.jit(jax.grad(lambda q, k, v: jaxattn.attention(q, k, v, is_causal=True).sum(), argnums=(0, 1, 2)))
    assert not same_program(causal, grad, q, k, v)


def test_one_stablehlo_is_one_program_whatever_names_the_compiled_text_carries(monkeypatch):
    """On a GPU, auto's forward and flash's (the custom_vjp of a split call around it) lowered to
    one StableHLO, locations apart, while their compiled texts differed: the lowered text decides
    first. A differing StableHLO still falls back to the compiled programs."""
    q, k, v = _inputs()
    auto, xla = _call(is_causal=True), _call(is_causal=True, backend="xla")
    assert lowered_text(auto, q, k, v) == lowered_text(xla, q, k, v)
    assert "loc(" not in lowered_text(auto, q, k, v)
    names = iter(range(10))
    monkeypatch.setattr(jaxattn.bench, "program_text", lambda fn, *args: f"compiled {next(names)}")
    assert same_program(auto, xla, q, k, v)
    assert not same_program(auto, _call(is_causal=False, backend="xla"), q, k, v)


def test_side_by_side_timing_takes_turns_and_keeps_failures_apart():
    order = []

    def call(name):
        def fn():
            order.append(name)
            return jnp.zeros(())
        return fn

    def broken():
        raise RuntimeError("no kernel for this")

    calls = {"a": call("a"), "b": call("b"), "c": call("c"), "broken": broken}
    seconds, failed = time_side_by_side(calls, warmup=1, repeats=3, inner=2)
    assert failed == {"broken": "RuntimeError"} and set(seconds) == {"a", "b", "c"}
    assert all(t >= 0.0 for t in seconds.values())
    timed = order[3:]  # after one warm-up call each
    samples = [timed[i] for i in range(0, len(timed), 2)]  # each sample is 2 calls of one column
    assert samples == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # each column opens one cycle


def test_side_by_side_timing_rejects_empty_samples():
    import pytest

    with pytest.raises(ValueError, match="repeats and inner must be ints >= 1, got repeats=0"):
        time_side_by_side({"a": lambda: jnp.zeros(())}, repeats=0)
