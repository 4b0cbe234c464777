"""Differentiated and forward-only calls each run their own measured winner (dispatch.py).

The test table (`data/tuning-cpu-split.json`, shipped by a test plugin as a plugin ships
its tables) says: forward-only, `fwdfast` wins; forward+backward, `trainfast` wins.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tuning_backends import FwdFast, Plugin, TrainFast, reset_counts

import jaxattn
from jaxattn import Hardware

TABLE = pathlib.Path(__file__).parent / "data" / "tuning-cpu-split.json"


class ShipsTheTestTable:
    @jaxattn.hookimpl
    def jaxattn_tuning_tables(self):
        return [TABLE]


@pytest.fixture(autouse=True)
def split_table(monkeypatch):
    monkeypatch.delenv("JAXATTN_BACKEND", raising=False)
    monkeypatch.setenv("JAXATTN_TUNING_CACHE", "off")
    reg = jaxattn.default_registry()
    reg.add_plugin(Plugin(), "tuning-backends")
    reg.add_plugin(ShipsTheTestTable(), "test-table")
    jaxattn.set_tuning_cache(None)
    with jaxattn.hardware.override(Hardware.cpu()):
        reset_counts()
        yield
    reg.remove_plugin("tuning-backends")
    reg.remove_plugin("test-table")
    jaxattn.set_tuning_cache(None)


def qkv():
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    return tuple(jax.random.normal(k, (2, 32, 2, 16), jnp.float32) for k in keys)


def reference(q, k, v, **kw):
    return jaxattn.attention(q, k, v, is_causal=True, backend="xla", **kw)


def loss(fn):
    return lambda q, k, v: (fn(q, k, v) ** 2).sum()


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_explain_shows_both_measured_choices():
    sel = jaxattn.select(*qkv(), is_causal=True)
    assert (sel.name, sel.forward_only.name) == ("trainfast", "fwdfast") and sel.splits
    text = sel.explain()
    assert "chosen:   trainfast for differentiated calls (by auto: measured forward+backward, 2.25x faster " \
           "than fwdfast (0.400 ms vs 0.900 ms)" in text
    assert "fwdfast for forward-only calls (by auto: measured forward, 3.00x faster than trainfast" in text
    assert "table tuning-cpu-split.json of local 0 (measured with jax 0.0.0), exact shape" in text
    forced = jaxattn.select(*qkv(), is_causal=True, backend="xla")
    assert forced.forward_only is None and not forced.splits  # a forced backend serves every call


def test_plain_call_runs_the_forward_winner_and_grad_the_training_winner():
    q, k, v = qkv()
    attn = lambda q, k, v: jaxattn.attention(q, k, v, is_causal=True)  # noqa: E731
    close(attn(q, k, v), reference(q, k, v))
    assert (FwdFast.calls, TrainFast.calls) == (1, 0)
    reset_counts()
    grads = jax.grad(loss(attn), argnums=(0, 1, 2))(q, k, v)
    assert (FwdFast.calls, TrainFast.calls) == (0, 1)
    for g, r in zip(grads, jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)):
        close(g, r)
    reset_counts()
    value, grad_q = jax.value_and_grad(loss(attn))(q, k, v)
    close(value, loss(reference)(q, k, v))
    close(jax.jit(jax.grad(loss(attn)))(q, k, v), grad_q)
    assert FwdFast.calls == 0 and TrainFast.calls == 2  # value_and_grad and jit(grad): training winner only


def test_split_under_jit_vmap_and_with_lse():
    q, k, v = qkv()
    attn = lambda q, k, v: jaxattn.attention(q, k, v, is_causal=True)  # noqa: E731
    close(jax.jit(attn)(q, k, v), reference(q, k, v))
    assert (FwdFast.calls, TrainFast.calls) == (1, 0)
    batched = jax.vmap(jax.grad(loss(attn)))(q[:, None], k[:, None], v[:, None])
    close(batched[:, 0], jax.grad(loss(reference))(q, k, v))
    with_lse = lambda q, k, v: jaxattn.attention(q, k, v, is_causal=True, return_lse=True)  # noqa: E731
    out, lse = with_lse(q, k, v)
    ref_out, ref_lse = reference(q, k, v, return_lse=True)
    close(out, ref_out)
    close(lse, ref_lse)

    def lse_loss(fn):
        return lambda q: fn(q, k, v)[1].sum() + fn(q, k, v)[0].sum()

    close(jax.grad(lse_loss(with_lse))(q), jax.grad(lse_loss(lambda *a: reference(*a, return_lse=True)))(q))


def test_calls_the_user_marks_run_one_backend():
    q, k, v = qkv()
    no_grad = jaxattn.OperationMetadata(needs_grad=False)
    sel = jaxattn.select(q, k, v, is_causal=True, metadata=no_grad)
    assert sel.name == "fwdfast" and sel.forward_only is None
    jaxattn.attention(q, k, v, is_causal=True, metadata=no_grad)
    assert (FwdFast.calls, TrainFast.calls) == (1, 0)
    unmeasured = jaxattn.select(q[:, :4], k, v, is_causal=True)  # no entry near it: declared priority
    assert unmeasured.forward_only is not None and not unmeasured.splits
    assert "for differentiated and forward-only calls (by auto: declared priority" in unmeasured.explain()


class ByKind:
    """A tuning cache that prefers `trainfast` for differentiated calls, `fwdfast` otherwise."""

    def ranking(self, request, hardware):
        return ("trainfast",) if request.needs_grad else ("fwdfast",)


@pytest.mark.parametrize("features", [
    dict(sliding_window=(3, 2)),
    dict(segment_ids=np.repeat(np.arange(4), 8)[None].repeat(2, 0)),
    dict(mask=np.tril(np.ones((32, 32), bool))),
    dict(logits_soft_cap=5.0, sinks=np.linspace(-1, 1, 2, dtype=np.float32)),
    dict(dropout_rate=0.25, dropout_rng=jax.random.PRNGKey(3)),
    dict(query_seq_lengths=np.array([32, 20]), key_value_seq_lengths=np.array([30, 9])),
])
def test_split_passes_every_kind_of_input_through(features):
    jaxattn.set_tuning_cache(ByKind())
    q, k, v = qkv()
    bias = jax.random.normal(jax.random.PRNGKey(4), (2, 2, 32, 32))
    split = lambda q, k, v, b: jaxattn.attention(q, k, v, b, **features)  # noqa: E731
    ref = lambda q, k, v, b: jaxattn.attention(q, k, v, b, backend="xla", **features)  # noqa: E731
    assert jaxattn.select(q, k, v, bias, **features).splits
    close(jax.jit(split)(q, k, v, bias), ref(q, k, v, bias))
    grads = jax.grad(loss(lambda *a: split(*a, bias)), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, jax.grad(loss(lambda *a: ref(*a, bias)), argnums=(0, 1, 2))(q, k, v)):
        close(g, r)
    close(jax.grad(lambda b: loss(lambda *a: split(*a, b))(q, k, v))(bias),
          jax.grad(lambda b: loss(lambda *a: ref(*a, b))(q, k, v))(bias))
    assert FwdFast.calls == 1 and TrainFast.calls == 2


def test_split_under_a_mesh():
    jaxattn.set_tuning_cache(ByKind())
    devices = np.array(jax.devices()[:4]).reshape(2, 2)
    meta = jaxattn.OperationMetadata(mesh=jax.sharding.Mesh(devices, ("dp", "tp")))
    q, k, v = qkv()
    split = lambda q, k, v: jaxattn.attention(q, k, v, is_causal=True, metadata=meta)  # noqa: E731
    close(jax.jit(split)(q, k, v), reference(q, k, v))
    close(jax.jit(jax.grad(loss(split)))(q, k, v), jax.grad(loss(reference))(q, k, v))
    assert FwdFast.calls == 1 and TrainFast.calls == 1
