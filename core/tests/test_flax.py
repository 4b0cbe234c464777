"""`jaxattn.flax`: Flax's own attention modules with jaxattn's `attention_fn`, and `FlexibleAttention`.

The spec is Flax's default `dot_product_attention`: the same module, parameters and
inputs must give the same outputs and parameter gradients (float32, < 1e-5 relative),
with Flax's masks (`make_causal_mask`, `make_attention_mask`, padding), bias, dropout with
`deterministic`, extra batch dimensions and the `decode=True` cache path. Rows whose keys
are all masked (padded queries) differ by design and are left out of the comparisons.
"""

from __future__ import annotations

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxattn
from jaxattn.flax import FlexibleAttention, LinenFlexibleAttention, attention_fn, make_attention_fn
from jaxattn.testing import relative_error as rel

TOL = 1e-5
B, T, F, HEADS = 2, 12, 16, 4



def inputs(seed=0, shape=(B, T, F)):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def nnx_pair(fn=attention_fn, **kwargs):
    make = lambda f: nnx.MultiHeadAttention(num_heads=HEADS, in_features=F, decode=False,  # noqa: E731
                                            rngs=nnx.Rngs(0), attention_fn=f, **kwargs)
    return make(nnx.dot_product_attention), make(fn)


def nnx_value_and_grads(module, x, **call):
    def loss(m):
        out = m(x, **call)
        return jnp.sum(out * jnp.sin(jnp.arange(out.shape[-1]))), out
    (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(module)
    return out, flat(nnx.state(grads, nnx.Param))


def flat(tree):
    """Every leaf in one vector: a relative error over all parameters (the key bias's gradient
    is zero in exact arithmetic, so its own relative error would compare rounding noise)."""
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


PAD = jnp.asarray([[1] * T, [1] * 7 + [0] * (T - 7)])


@pytest.mark.parametrize("mask_kind", ["none", "causal_mask", "is_causal", "padding", "padding_and_causal"])
def test_nnx_multi_head_attention_matches_flax(mask_kind):
    x = inputs(1)
    call = {}
    if mask_kind == "causal_mask":
        call["mask"] = nnx.make_causal_mask(jnp.ones((B, T)))
    if mask_kind == "is_causal":
        call["is_causal"] = True
    if mask_kind.startswith("padding"):
        call["mask"] = nnx.make_attention_mask(PAD, PAD)
        if mask_kind.endswith("causal"):
            call["mask"] = nnx.combine_masks(call["mask"], nnx.make_causal_mask(PAD))
    ref, ours = nnx_pair()
    ref_out, ref_grads = nnx_value_and_grads(ref, x * PAD[..., None], **call)
    out, grads = nnx_value_and_grads(ours, x * PAD[..., None], **call)
    keep = np.asarray(PAD, bool) if mask_kind.startswith("padding") else np.ones((B, T), bool)
    assert rel(np.asarray(out)[keep], np.asarray(ref_out)[keep]) < TOL
    if not mask_kind.startswith("padding"):  # padded rows differ by design, and so do the gradients through them
        assert rel(grads, ref_grads) < TOL


def test_linen_multi_head_attention_matches_flax_with_padding():
    x = inputs(2)
    ref = nn.MultiHeadDotProductAttention(num_heads=HEADS)
    ours = nn.MultiHeadDotProductAttention(num_heads=HEADS, attention_fn=attention_fn)
    params = ref.init(jax.random.PRNGKey(0), x)
    mask = nn.combine_masks(nn.make_attention_mask(PAD, PAD), nn.make_causal_mask(PAD))
    keep = np.asarray(PAD, bool)
    a, b = ref.apply(params, x, mask=mask), ours.apply(params, x, mask=mask)
    assert rel(np.asarray(b)[keep], np.asarray(a)[keep]) < TOL
    grad = lambda m: jax.grad(lambda p: m.apply(p, x, mask=nn.make_causal_mask(PAD)).sum())(params)  # noqa: E731
    assert rel(flat(grad(ours)), flat(grad(ref))) < TOL


@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_decode_cache_path_matches_flax(api):
    x = inputs(3)
    if api == "nnx":
        def run(fn):
            m = nnx.MultiHeadAttention(num_heads=HEADS, in_features=F, decode=True, rngs=nnx.Rngs(0), attention_fn=fn)
            m.init_cache((B, T, F))
            return jnp.concatenate([m(x[:, t:t + 1]) for t in range(T)], axis=1)
        a, b = run(nnx.dot_product_attention), run(attention_fn)
    else:
        def run(fn):
            m = nn.MultiHeadDotProductAttention(num_heads=HEADS, decode=True, attention_fn=fn)
            variables = m.init(jax.random.PRNGKey(0), x)
            params, cache = variables["params"], variables["cache"]
            outs = []
            for t in range(T):
                out, mutated = m.apply({"params": params, "cache": cache}, x[:, t:t + 1], mutable=["cache"])
                cache = mutated["cache"]
                outs.append(out)
            return jnp.concatenate(outs, axis=1)
        a, b = run(nn.dot_product_attention), run(attention_fn)
    assert rel(b, a) < TOL


def test_functional_bias_gqa_and_extra_batch_dims():
    ks = jax.random.split(jax.random.PRNGKey(4), 4)
    q = jax.random.normal(ks[0], (3, B, T, HEADS, 8))  # two batch dims
    k = jax.random.normal(ks[1], (3, B, T, 2, 8))  # grouped-query: 2 kv heads
    v = jax.random.normal(ks[2], (3, B, T, 2, 8))
    bias = jax.random.normal(ks[3], (3, B, HEADS, T, T))
    mask = nnx.make_causal_mask(jnp.ones((3, B, T)), dtype=jnp.bool_)
    ref = nnx.dot_product_attention(q, k, v, bias=bias, mask=mask)
    got = attention_fn(q, k, v, bias=bias, mask=mask)
    assert got.shape == ref.shape and rel(got, ref) < TOL
    dref = jax.grad(lambda q, b: nnx.dot_product_attention(q, k, v, bias=b, mask=mask).sum(), (0, 1))(q, bias)
    dgot = jax.grad(lambda q, b: attention_fn(q, k, v, bias=b, mask=mask).sum(), (0, 1))(q, bias)
    for g, r in zip(dgot, dref):
        assert rel(g, r) < TOL


def test_dropout_follows_deterministic_and_the_key():
    ks = jax.random.split(jax.random.PRNGKey(5), 3)
    q, k, v = (jax.random.normal(kk, (B, T, HEADS, 8)) for kk in ks)
    plain = attention_fn(q, k, v)
    rng = jax.random.PRNGKey(11)
    same = attention_fn(q, k, v, dropout_rate=0.5, dropout_rng=rng, deterministic=True)
    np.testing.assert_array_equal(same, plain)
    a = attention_fn(q, k, v, dropout_rate=0.5, dropout_rng=rng, deterministic=False)
    b = attention_fn(q, k, v, dropout_rate=0.5, dropout_rng=rng, deterministic=False)
    c = attention_fn(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.PRNGKey(12), deterministic=False)
    np.testing.assert_array_equal(a, b)
    assert rel(a, plain) > 0.1 and rel(a, c) > 0.1
    many = jax.jit(jax.vmap(lambda r: attention_fn(q, k, v, dropout_rate=0.5, dropout_rng=r)))
    mean = jnp.mean(many(jax.random.split(jax.random.PRNGKey(13), 64)), axis=0)
    assert rel(mean, plain) < 0.2  # unbiased: the mean over keys approaches no dropout
    with pytest.raises(ValueError, match="dropout_rng"):
        attention_fn(q, k, v, dropout_rate=0.5)


def test_make_attention_fn_binds_jaxattn_options():
    ks = jax.random.split(jax.random.PRNGKey(6), 3)
    q, k, v = (3.0 * jax.random.normal(kk, (B, T, HEADS, 8)) for kk in ks)
    fn = make_attention_fn(backend="vanilla", logits_soft_cap=2.0)
    want = jaxattn.attention(q, k, v, logits_soft_cap=2.0, mask=jaxattn.CausalMask(0))
    assert rel(fn(q, k, v, is_causal=True), want) < TOL
    module = nnx.MultiHeadAttention(num_heads=HEADS, in_features=F, decode=False, rngs=nnx.Rngs(0), attention_fn=fn)
    assert module(inputs(7)).shape == (B, T, F)
    with pytest.raises(ValueError, match=r"make_attention_fn: unknown keyword\(s\) \['return_lse'\]"):
        make_attention_fn(return_lse=True)
    with pytest.raises(ValueError, match="sow_weights"):
        attention_fn(q, k, v, module=object())
    with pytest.raises(ValueError, match="batch dims must match"):
        attention_fn(q, k[:1], v[:1])


def qkv(seed, n=T):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (B, n, HEADS, 8)), jax.random.normal(ks[1], (B, n, 2, 8)),
            jax.random.normal(ks[2], (B, n, 2, 8)))


def test_flexible_attention_forwards_to_attention_and_the_cache():
    q, k, v = qkv(8)
    attn = FlexibleAttention(jaxattn.AttentionMechanisms.VANILLA, is_causal=True, logits_soft_cap=5.0)
    assert rel(attn(q, k, v), jaxattn.attention(q, k, v, is_causal=True, logits_soft_cap=5.0)) < TOL
    out, lse = attn(q, k, v, return_lse=True)
    assert lse.shape == (B, HEADS, T)
    cache = jaxattn.KVCache.create(B, T + 4, 2, 8, jnp.float32)
    first, cache = attn(q[:, :5], k[:, :5], v[:, :5], cache=cache)
    rest, cache = attn(q[:, 5:], k[:, 5:], v[:, 5:], cache=cache)
    assert rel(jnp.concatenate([first, rest], 1), attn(q, k, v)) < TOL
    with pytest.raises(ValueError, match="causal by construction"):
        attn(q, k, v, cache=cache, is_causal=False)


def test_flexible_attention_rejects_bad_configuration():
    with pytest.raises(ValueError, match="give one of them"):
        FlexibleAttention("flash_attn2", backend="xla")
    with pytest.raises(ValueError, match="hold arrays"):
        FlexibleAttention(sinks=jnp.zeros(HEADS))
    with pytest.raises(ValueError, match=r"unknown keyword\(s\) \['causal'\]"):
        FlexibleAttention(causal=True)
    with pytest.raises(ValueError, match="dropout_rate"):
        FlexibleAttention(dropout_rate=1.5)
    attn = FlexibleAttention(dropout_rate=0.1)
    q, k, v = qkv(9)
    with pytest.raises(ValueError, match="rngs: dropout needs an RNG stream"):
        attn(q, k, v)
    np.testing.assert_array_equal(attn(q, k, v, deterministic=True), jaxattn.attention(q, k, v))


class Block(nnx.Module):
    """A residual attention block: the shape of a decoder layer, for the transforms below."""

    def __init__(self, rngs: nnx.Rngs):
        self.qkv = nnx.Linear(F, 3 * F, rngs=rngs)
        self.attn = FlexibleAttention("auto", is_causal=True, dropout_rate=0.1, rngs=rngs)

    def __call__(self, x, deterministic=False):
        q, k, v = (t.reshape(*t.shape[:2], HEADS, F // HEADS) for t in jnp.split(self.qkv(x), 3, axis=-1))
        return x + self.attn(q, k, v, deterministic=deterministic).reshape(x.shape)


def test_flexible_attention_under_nnx_jit_remat_and_scan_over_layers():
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return Block(rngs)

    blocks = make(nnx.Rngs(0, dropout=1))

    @nnx.jit(static_argnames="deterministic")
    def loss(blocks, x, deterministic):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        @nnx.remat
        def layer(block, x):
            return block(x, deterministic)
        return jnp.sum(layer(blocks, x) ** 2)

    x = inputs(10)
    a, grads = nnx.value_and_grad(loss)(blocks, x, True)
    b = loss(blocks, x, True)
    assert np.isfinite(a) and abs(a - b) < 1e-4 * abs(a)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(nnx.state(grads, nnx.Param)))
    assert abs(loss(blocks, x, False) - a) > 1e-6  # dropout draws from the split streams


def test_flexible_attention_inside_shard_map():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("dp",))
    attn = FlexibleAttention(is_causal=True)
    q, k, v = qkv(11)
    spec = jax.sharding.PartitionSpec("dp")
    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:
        from jax.experimental.shard_map import shard_map
    f = shard_map(lambda q, k, v: attn(q, k, v), mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
    assert rel(jax.jit(f)(q, k, v), jaxattn.attention(q, k, v, is_causal=True)) < TOL


def test_linen_flexible_attention():
    q, k, v = qkv(12)
    m = LinenFlexibleAttention(attention_mechanism="vanilla", attention_kwargs={"is_causal": True}, dropout_rate=0.3)
    variables = m.init(jax.random.PRNGKey(0), q, k, v, deterministic=True)
    assert variables == {} or not jax.tree_util.tree_leaves(variables)  # no parameters
    plain = m.apply(variables, q, k, v, deterministic=True)
    assert rel(plain, jaxattn.attention(q, k, v, is_causal=True)) < TOL
    dropped = m.apply(variables, q, k, v, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert rel(dropped, plain) > 0.05
    cache = jaxattn.KVCache.create(B, T, 2, 8, jnp.float32)
    out, cache = m.apply(variables, q, k, v, cache=cache, deterministic=True)
    assert rel(out, plain) < TOL and int(cache.lengths[0]) == T


def test_attention_output_is_named_context_for_remat_policies():
    q, k, v = qkv(13)
    policy = jax.checkpoint_policies.save_only_these_names("context")
    jaxpr = jax.make_jaxpr(jax.checkpoint(lambda q: FlexibleAttention()(q, k, v).sum(), policy=policy))(q)
    assert "name=context" in str(jaxpr)


def test_core_imports_and_works_without_flax():
    code = (
        "import sys; sys.modules['flax'] = None\n"
        "import jax.numpy as jnp, jaxattn\n"
        "x = jnp.ones((1, 4, 2, 8)); assert jaxattn.attention(x, x, x).shape == (1, 4, 2, 8)\n"
        "assert 'flax' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n    import jaxattn.flax\nexcept ImportError as err:\n    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pip install 'jaxattn[flax]'" in done.stdout
