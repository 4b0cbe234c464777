"""A small decoder-only transformer in Flax NNX whose attention is `jaxattn.flax.FlexibleAttention`.

It trains a few steps on a synthetic next-token task (each sequence counts up by its own
stride, so the next token follows from the context: the loss falls within a few dozen
steps), then generates greedily with one `jaxattn.KVCache` per layer and checks that the
tokens equal those of recomputing the whole sequence without a cache. The same script runs
on a GPU, where `auto` picks the fastest installed backend, and `--bench` times a training
step against the same model with Flax's own `nnx.dot_product_attention` (`--attention flax`).

    python examples/decoder_nnx.py                                  # CPU: train, then generate
    python examples/decoder_nnx.py --seq 4096 --batch 4 --d-model 1024 --layers 4 --heads 8 \\
        --kv-heads 2 --dtype bfloat16 --bench                       # a GPU: tokens/s, both attentions
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxattn
from jaxattn.flax import FlexibleAttention


@dataclass(frozen=True)
class Config:
    vocab: int = 64
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    mlp: int = 4  # hidden width = mlp * d_model
    dtype: str = "float32"
    backend: str = "auto"
    attention: str = "jaxattn"  # or "flax": nnx.dot_product_attention, for comparison

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


def rope(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary position embedding of `x` `[B, S, H, D]` at integer `positions` `[B, S]`."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle = positions[..., None, None].astype(jnp.float32) * freq
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Block(nnx.Module):
    """Pre-norm decoder block: grouped-query attention with RoPE, then a SwiGLU MLP."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        dense = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, rngs=rngs)  # noqa: E731
        self.cfg = cfg
        self.norm1 = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.q = dense(cfg.d_model, cfg.heads * cfg.head_dim)
        self.kv = dense(cfg.d_model, 2 * cfg.kv_heads * cfg.head_dim)
        self.o = dense(cfg.heads * cfg.head_dim, cfg.d_model)
        self.attn = FlexibleAttention(cfg.backend, is_causal=True)
        self.norm2 = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.up = dense(cfg.d_model, 2 * cfg.mlp * cfg.d_model)
        self.down = dense(cfg.mlp * cfg.d_model, cfg.d_model)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: jaxattn.KVCache | None = None):
        cfg = self.cfg
        b, s, _ = x.shape
        h = self.norm1(x)
        q = rope(self.q(h).reshape(b, s, cfg.heads, cfg.head_dim), positions)
        k, v = jnp.split(self.kv(h).reshape(b, s, 2 * cfg.kv_heads, cfg.head_dim), 2, axis=2)
        k = rope(k, positions)
        if cache is not None:
            out, cache = self.attn(q, k, v, cache=cache)
        elif cfg.attention == "flax":
            rep = cfg.heads // cfg.kv_heads
            out = nnx.dot_product_attention(q, jnp.repeat(k, rep, 2), jnp.repeat(v, rep, 2),
                                            mask=nnx.make_causal_mask(jnp.ones((b, s)), dtype=jnp.bool_))
        else:
            out = self.attn(q, k, v)
        x = x + self.o(out.reshape(b, s, -1))
        gate, up = jnp.split(self.up(self.norm2(x)), 2, axis=-1)
        return x + self.down(jax.nn.silu(gate) * up), cache


class Decoder(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab, cfg.d_model, dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
        self.norm = nnx.RMSNorm(cfg.d_model, dtype=jnp.dtype(cfg.dtype), rngs=rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, caches: list | None = None):
        """Logits `[B, S, vocab]` (float32), and the updated caches when `caches` are given."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed(tokens)
        new_caches = []
        for i, block in enumerate(self.blocks):
            x, cache = block(x, positions, None if caches is None else caches[i])
            new_caches.append(cache)
        logits = self.embed.attend(self.norm(x)).astype(jnp.float32)
        return logits if caches is None else (logits, new_caches)


def batch_of_counts(key: jax.Array, batch: int, seq: int, vocab: int) -> jax.Array:
    """`[batch, seq + 1]` tokens: each row starts anywhere and counts up by its own stride."""
    start, stride = jax.random.randint(key, (2, batch, 1), 0, vocab)
    return (start + (stride % 7 + 1) * jnp.arange(seq + 1)) % vocab


def loss_fn(model: Decoder, tokens: jax.Array) -> jax.Array:
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@nnx.jit
def train_step(model: Decoder, optimizer: nnx.Optimizer, tokens: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
    optimizer.update(model, grads)
    return loss


def train(model: Decoder, steps: int, batch: int, seq: int, lr: float = 3e-3) -> list[float]:
    optimizer = nnx.Optimizer(model, optax.adamw(lr), wrt=nnx.Param)
    key = jax.random.PRNGKey(1)
    losses = []
    for _ in range(steps):
        key, sub = jax.random.split(key)
        losses.append(float(train_step(model, optimizer, batch_of_counts(sub, batch, seq, model.cfg.vocab))))
    return losses


@nnx.jit
def _prefill(model: Decoder, prompt: jax.Array, caches: list) -> tuple[jax.Array, list]:
    logits, caches = model(prompt, caches=caches)
    return jnp.argmax(logits[:, -1], axis=-1), caches


@nnx.jit
def _decode_step(model: Decoder, token: jax.Array, position: jax.Array, caches: list) -> tuple[jax.Array, list]:
    logits, caches = model(token[:, None], positions=position[:, None], caches=caches)
    return jnp.argmax(logits[:, -1], axis=-1), caches


def generate(model: Decoder, prompt: jax.Array, new_tokens: int) -> jax.Array:
    """Greedy decoding with one KVCache per layer: prefill the prompt, then one token per step."""
    cfg = model.cfg
    b, p = prompt.shape
    caches = [jaxattn.KVCache.create(b, p + new_tokens, cfg.kv_heads, cfg.head_dim, jnp.dtype(cfg.dtype))
              for _ in range(cfg.layers)]
    token, caches = _prefill(model, prompt, caches)
    out = [token]
    for t in range(new_tokens - 1):
        token, caches = _decode_step(model, token, jnp.full((b,), p + t), caches)
        out.append(token)
    return jnp.stack(out, axis=1)


def generate_without_cache(model: Decoder, prompt: jax.Array, new_tokens: int) -> jax.Array:
    """The reference: recompute the whole sequence for every new token."""
    tokens = prompt
    for _ in range(new_tokens):
        tokens = jnp.concatenate([tokens, jnp.argmax(model(tokens)[:, -1], axis=-1)[:, None]], axis=1)
    return tokens[:, prompt.shape[1]:]


def bench(cfg: Config, batch: int, seq: int, repeats: int = 5, calls: int = 5) -> dict:
    """Median tokens/s of a training step, jaxattn's attention against Flax's, in alternation."""
    result = {}
    models = {name: Decoder(Config(**{**cfg.__dict__, "attention": name}), nnx.Rngs(0)) for name in ("jaxattn", "flax")}
    optimizers = {n: nnx.Optimizer(m, optax.adamw(1e-4), wrt=nnx.Param) for n, m in models.items()}
    tokens = batch_of_counts(jax.random.PRNGKey(0), batch, seq, cfg.vocab)
    times: dict[str, list[float]] = {n: [] for n in models}
    for n in models:
        for _ in range(2):
            train_step(models[n], optimizers[n], tokens).block_until_ready()
    for _ in range(repeats):
        for n in models:
            t0 = time.perf_counter()
            for _ in range(calls):
                loss = train_step(models[n], optimizers[n], tokens)
            loss.block_until_ready()
            times[n].append((time.perf_counter() - t0) / calls)
    for n, ts in times.items():
        ts = sorted(ts)
        result[n] = {"step_ms": 1e3 * ts[len(ts) // 2], "tokens_per_s": batch * seq / ts[len(ts) // 2]}
    result["speedup"] = result["jaxattn"]["tokens_per_s"] / result["flax"]["tokens_per_s"]
    x = jnp.zeros((batch, seq, cfg.heads, cfg.head_dim), jnp.dtype(cfg.dtype))
    kv = jnp.zeros((batch, seq, cfg.kv_heads, cfg.head_dim), jnp.dtype(cfg.dtype))
    result["chosen_backend"] = jaxattn.select(x, x if cfg.heads == cfg.kv_heads else kv, kv, is_causal=True,
                                       backend=cfg.backend).name
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backend", default="auto", help="a jaxattn backend or EasyDeL mechanism name")
    parser.add_argument("--attention", choices=("jaxattn", "flax"), default="jaxattn")
    parser.add_argument("--generate", type=int, default=8, help="tokens to generate after training")
    parser.add_argument("--bench", action="store_true", help="time a training step: jaxattn vs Flax attention")
    args = parser.parse_args(argv)
    cfg = Config(vocab=args.vocab, d_model=args.d_model, layers=args.layers, heads=args.heads,
                 kv_heads=args.kv_heads, dtype=args.dtype, backend=args.backend, attention=args.attention)
    if args.bench:
        report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch": args.batch,
                  "seq": args.seq, **cfg.__dict__, **bench(cfg, args.batch, args.seq)}
        print(json.dumps(report))
        return report
    model = Decoder(cfg, nnx.Rngs(0))
    losses = train(model, args.steps, args.batch, args.seq)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"loss {first:.3f} -> {last:.3f} over {args.steps} steps ({cfg.attention}, backend {cfg.backend})")
    if not last < 0.8 * first:
        raise SystemExit(f"the loss did not fall: {first:.3f} -> {last:.3f}")
    prompt = batch_of_counts(jax.random.PRNGKey(7), 2, 12, cfg.vocab)[:, :12]
    cached = generate(model, prompt, args.generate)
    plain = generate_without_cache(model, prompt, args.generate)
    print("prompt   ", prompt.tolist())
    print("generated", cached.tolist())
    if not bool(jnp.all(cached == plain)):
        raise SystemExit(f"KV-cache generation differs from recomputation: {cached.tolist()} vs {plain.tolist()}")
    return {"losses": losses, "generated": cached.tolist()}


if __name__ == "__main__":
    main()
