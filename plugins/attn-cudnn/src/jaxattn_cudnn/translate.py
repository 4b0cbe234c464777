"""Translation of jaxattn's normalized inputs into one cuDNN fused-attention call.

cuDNN (as JAX drives it) applies, natively: a top-left causal mask, a left sliding window
together with it, a padding mask from per-example sequence lengths, and an additive bias.
jaxattn's masks are reduced (`jaxattn.mask_parts`) to a band `lo <= j - i <= hi`,
segment ids and a dense bool mask; they become cuDNN arguments as follows:

1. Static slicing. Query rows that can see no key under the band, and keys no row can
   see, are cut off (static slices; their outputs are zeros, their lse -inf, their
   gradients zero). In the sliced problem the band is re-expressed relative to the new
   origins; bounds that exclude nothing are dropped. This is what turns a
   bottom-right causal mask with q_len > kv_len, `CausalMask(offset < 0)`, `CausalMask(0)`
   with q_len < kv_len, and every band in decode (q_len == 1) into cuDNN's own masks.
2. The remaining band must be cuDNN's: none, `hi == 0` (CAUSAL), or `hi == 0` with a
   finite `lo` (CAUSAL + sliding window `1 - lo`). Otherwise, if a bias is passed anyway
   (bias, dense mask or segment ids), the band joins that bias; if not, the call is
   rejected (`Untranslatable`).
3. Segment ids and the dense mask become an additive bias: 0 where allowed, a large
   finite negative value (JAX's, per dtype) where not; a user bias is added to it.
4. Sequence lengths become cuDNN's padding mask (both lengths, int32).
5. Rows that end up seeing no key at run time (padding, segment ids, dense mask) are
   found from the same arguments and set to zero output and -inf lse; their inputs are
   masked so that their gradients are exactly zero.

`emulate_cudnn(call)` evaluates what cuDNN computes from a `CudnnCall` with plain
`jax.numpy`; the CPU tests run translate -> emulate -> finish against the `xla`
backend, which proves that the translation is exact without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxattn import AttentionInputs, mask_parts

from . import _compat


class Untranslatable(ValueError):
    """The inputs need something cuDNN (as JAX exposes it) cannot express exactly."""


@dataclass(frozen=True)
class BandPlan:
    """How a band `lo <= j - i <= hi` on a `q_len x kv_len` problem reaches cuDNN.

    Rows `[q_start, q_stop)` and keys `[k_start, k_stop)` go to cuDNN; `lo`/`hi` is the
    band in those sliced coordinates (None: no bound); `causal`/`window` are the cuDNN
    arguments, or `in_bias` says the band is applied through the bias instead.
    `empty`: no query sees any key at all.
    """

    q_start: int
    q_stop: int
    k_start: int
    k_stop: int
    lo: int | None = None
    hi: int | None = None
    causal: bool = False
    window: int | None = None
    in_bias: bool = False
    empty: bool = False

    @property
    def q_len(self) -> int:
        return self.q_stop - self.q_start

    @property
    def kv_len(self) -> int:
        return self.k_stop - self.k_start


def native_band(q_len: int, kv_len: int, alignment: str = _compat.CAUSAL_ALIGNMENT) -> int:
    """The `hi` of cuDNN's CAUSAL mask on a `q_len x kv_len` problem."""
    return 0 if alignment == "top_left" else kv_len - q_len


def plan_band(lo: int | None, hi: int | None, q_len: int, kv_len: int, *, bias_available: bool = False,
              alignment: str = _compat.CAUSAL_ALIGNMENT) -> BandPlan:
    """Plan the slicing and the cuDNN mask for a band (see the module docstring).

    Raises `Untranslatable` when the band is neither cuDNN's nor can join a bias.
    """
    if lo is not None and hi is not None and lo > hi:
        return BandPlan(0, 0, 0, 0, empty=True)
    # Rows that see at least one key: some j in [0, kv_len) with lo <= j - i <= hi.
    q0 = max(0, -hi) if hi is not None else 0
    q1 = min(q_len - 1, kv_len - 1 - lo) if lo is not None else q_len - 1
    if q0 > q1:
        return BandPlan(0, 0, 0, 0, empty=True)
    # Keys that one of those rows sees.
    k0 = max(0, q0 + lo) if lo is not None else 0
    k1 = min(kv_len - 1, q1 + hi) if hi is not None else kv_len - 1
    sq, sk = q1 - q0 + 1, k1 - k0 + 1
    shift = q0 - k0  # d' = (j - k0) - (i - q0) = d + q0 - k0
    new_lo = None if lo is None or lo + shift <= -(sq - 1) else lo + shift
    new_hi = None if hi is None or hi + shift >= sk - 1 else hi + shift
    plan = dict(q_start=q0, q_stop=q1 + 1, k_start=k0, k_stop=k1 + 1, lo=new_lo, hi=new_hi)
    if new_lo is None and new_hi is None:
        return BandPlan(**plan)
    target = native_band(sq, sk, alignment)
    if new_hi is not None and new_hi == target:
        window = None if new_lo is None else target - new_lo + 1
        return BandPlan(**plan, causal=True, window=window)
    if bias_available:
        return BandPlan(**plan, in_bias=True)
    raise Untranslatable(
        f"the mask allows {_describe(lo, hi)} on q_len={q_len}, kv_len={kv_len}; cuDNN's masks "
        f"(as JAX drives them) are causal aligned {alignment.replace('_', '-')} with an optional "
        "left window, which cannot express it"
    )


def _describe(lo: int | None, hi: int | None) -> str:
    left = "" if lo is None else f"{lo} <= "
    right = "" if hi is None else f" <= {hi}"
    return f"{left}j - i{right}"


@dataclass(frozen=True, eq=False)
class CudnnCall:
    """The arguments of one cuDNN fused-attention call, and how to finish its result."""

    query: jax.Array
    key: jax.Array
    value: jax.Array
    bias: jax.Array | None
    q_seqlen: jax.Array | None
    kv_seqlen: jax.Array | None
    scale: float
    causal: bool
    window: int | None
    return_lse: bool
    plan: BandPlan
    q_len: int  # the caller's q_len, before slicing
    row_visible: jax.Array | None  # [B|1, H|1, sliced q_len] bool; None: every row sees a key


def _slice(x: jax.Array, axis: int, start: int, stop: int) -> jax.Array:
    """Static slice along `axis`, skipped for broadcast (size-1) dims and no-op slices."""
    if x.shape[axis] == 1 or (start == 0 and stop == x.shape[axis]):
        return x
    return jax.lax.slice_in_dim(x, start, stop, axis=axis)


def _lengths(lengths: jax.Array | None, start: int, size: int, batch: int) -> jax.Array:
    if lengths is None:
        return jnp.full((batch,), size, jnp.int32)
    return jnp.clip(lengths.astype(jnp.int32) - start, 0, size)


def _band_allowed(lo: int | None, hi: int | None, sq: int, sk: int) -> jax.Array | None:
    if lo is None and hi is None:
        return None
    d = jnp.arange(sk)[None, :] - jnp.arange(sq)[:, None]
    ok = jnp.ones((sq, sk), bool)
    if lo is not None:
        ok &= d >= lo
    if hi is not None:
        ok &= d <= hi
    return ok[None, None]


def translate(inputs: AttentionInputs) -> CudnnCall:
    """Turn normalized inputs into a `CudnnCall`; raise `Untranslatable` with the reason.

    For inputs the backend's declared capabilities admit (no soft-cap, sinks, dropout or
    chunked mask: the core checks them before the forward runs); what only the exact
    band decides is checked here, as `capabilities.request_reasons` plans it."""
    q, k, v = inputs.query, inputs.key, inputs.value
    b, q_len, hq, _ = q.shape
    kv_len = k.shape[1]
    try:
        parts = mask_parts(inputs.mask, q_len, kv_len)
    except ValueError as err:
        raise Untranslatable(str(err)) from None
    has_mask_arrays = parts.dense is not None or parts.q_segment_ids is not None
    uses_bias = inputs.bias is not None or has_mask_arrays
    plan = plan_band(parts.band_lo, parts.band_hi, q_len, kv_len, bias_available=uses_bias)
    if plan.empty:
        return CudnnCall(q, k, v, None, None, None, inputs.scale, False, None, inputs.return_lse,
                         plan, q_len, None)
    qs, qe, ks, ke = plan.q_start, plan.q_stop, plan.k_start, plan.k_stop
    sq, sk = plan.q_len, plan.kv_len
    q = _slice(q, 1, qs, qe)
    k = _slice(k, 1, ks, ke)
    v = _slice(v, 1, ks, ke)

    padded = inputs.q_seq_lengths is not None or inputs.kv_seq_lengths is not None
    q_seqlen = kv_seqlen = None
    if padded:
        q_seqlen = _lengths(inputs.q_seq_lengths, qs, sq, b)
        kv_seqlen = _lengths(inputs.kv_seq_lengths, ks, sk, b)

    # Mask arrays (and the band, if cuDNN cannot take it) -> additive bias.
    allowed = None
    if parts.dense is not None:
        allowed = _slice(_slice(parts.dense, 2, qs, qe), 3, ks, ke)
    if parts.q_segment_ids is not None:
        q_ids = _slice(parts.q_segment_ids, 1, qs, qe)
        kv_ids = _slice(parts.kv_segment_ids, 1, ks, ke)
        seg = (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
        allowed = seg if allowed is None else allowed & seg
    bias = None
    if inputs.bias is not None:
        user = _slice(_slice(inputs.bias, 2, qs, qe), 3, ks, ke)
        bias = user.astype(q.dtype)
    if uses_bias:
        band = _band_allowed(plan.lo, plan.hi, sq, sk) if plan.in_bias else None
        bias_allowed = allowed
        if band is not None:
            bias_allowed = band if bias_allowed is None else bias_allowed & band
        if bias_allowed is not None:
            mask_bias = jnp.where(bias_allowed, jnp.asarray(0, q.dtype),
                                  jnp.asarray(_compat.mask_value(q.dtype), q.dtype))
            bias = mask_bias if bias is None else bias + mask_bias
        lead = bias.shape[:2]
        bias = jnp.broadcast_to(bias, (*lead, sq, sk))  # cuDNN wants the full [.., T, S]

    # Rows that may see no key at run time.
    row_visible = None
    if padded or has_mask_arrays:
        kv_ok = None if kv_seqlen is None else (jnp.arange(sk)[None, :] < kv_seqlen[:, None])  # [B, S]
        if has_mask_arrays:
            full = allowed
            band = _band_allowed(plan.lo, plan.hi, sq, sk)
            if band is not None:
                full = full & band
            if kv_ok is not None:
                full = full & kv_ok[:, None, None, :]
            row_visible = jnp.any(full, axis=-1)  # [B|1, H|1, T]
        else:
            i = jnp.arange(sq)
            first = jnp.zeros_like(i) if plan.lo is None else jnp.maximum(0, i + plan.lo)
            last = jnp.full_like(i, sk - 1) if plan.hi is None else jnp.minimum(sk - 1, i + plan.hi)
            last = last[None, :] if kv_seqlen is None else jnp.minimum(last[None, :], kv_seqlen[:, None] - 1)
            row_visible = (first[None, :] <= last)[:, None, :]  # [B|1, 1, T]
        if q_seqlen is not None:
            row_visible = row_visible & (jnp.arange(sq)[None, :] < q_seqlen[:, None])[:, None, :]
        # Gradients of rows that see nothing, and of padded keys, are exactly zero.
        q = jnp.where(_rows_bthd(row_visible, q.shape), q, jnp.zeros((), q.dtype))
        if kv_ok is not None:
            k = jnp.where(kv_ok[:, :, None, None], k, jnp.zeros((), k.dtype))
            v = jnp.where(kv_ok[:, :, None, None], v, jnp.zeros((), v.dtype))

    return CudnnCall(
        query=q, key=k, value=v, bias=bias, q_seqlen=q_seqlen, kv_seqlen=kv_seqlen,
        scale=float(inputs.scale), causal=plan.causal, window=plan.window,
        return_lse=inputs.return_lse, plan=plan, q_len=q_len, row_visible=row_visible,
    )


def _rows_bthd(row_visible: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`[B|1, H|1, T]` -> broadcastable against `[B, T, H, D]`, any head count."""
    vis = jnp.swapaxes(row_visible, 1, 2)[..., None]  # [B|1, T, H|1, 1]
    if vis.shape[2] not in (1, shape[2]):  # a per-q-head mask against K/V heads: reduce
        vis = jnp.any(vis, axis=2, keepdims=True)
    return vis


def finish(call: CudnnCall, out: jax.Array | None, lse: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """Zero rows that see no key, and put the sliced-off rows back (zeros, lse -inf)."""
    b, _, hq, _ = call.query.shape
    dv = call.value.shape[-1]
    plan = call.plan
    if plan.empty:
        out = jnp.zeros((b, call.q_len, hq, dv), call.query.dtype)
        lse = jnp.full((b, hq, call.q_len), -jnp.inf, jnp.float32) if call.return_lse else None
        return out, lse
    if call.row_visible is not None:
        out = jnp.where(_rows_bthd(call.row_visible, out.shape), out, jnp.zeros((), out.dtype))
        if lse is not None:
            lse = jnp.where(call.row_visible, lse, -jnp.inf)
    before, after = plan.q_start, call.q_len - plan.q_stop
    if before or after:
        out = jnp.pad(out, ((0, 0), (before, after), (0, 0), (0, 0)))
        if lse is not None:
            lse = jnp.pad(lse, ((0, 0), (0, 0), (before, after)), constant_values=-jnp.inf)
    return out, lse


def run_cudnn(call: CudnnCall) -> tuple[jax.Array, jax.Array | None]:
    """Execute `call` with cuDNN (on a CUDA GPU) and finish the result."""
    if call.plan.empty:
        return finish(call, None, None)
    out, lse = _compat.fused_attention(
        call.query, call.key, call.value, call.bias, call.q_seqlen, call.kv_seqlen,
        scale=call.scale, causal=call.causal, window=call.window, return_lse=call.return_lse,
    )
    return finish(call, out, lse)


def emulate_cudnn(call: CudnnCall, alignment: str = _compat.CAUSAL_ALIGNMENT) -> tuple[jax.Array, jax.Array | None]:
    """What cuDNN computes from `call`'s arguments, in plain `jax.numpy` (float32), finished.

    Masked logits get a large finite negative value, as in cuDNN, so a row that sees no
    key comes out as some average of values: `finish` must be what zeroes it.
    """
    if call.plan.empty:
        return finish(call, None, None)
    q, k, v = call.query, call.key, call.value
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    qf = q.astype(jnp.float32).reshape(b, sq, hkv, g, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qf, k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST).reshape(b, hq, sq, sk)
    logits = logits * call.scale
    if call.bias is not None:
        logits = logits + call.bias.astype(jnp.float32)
    ok = jnp.ones((1, 1, sq, sk), bool)
    if call.causal:
        d_ij = jnp.arange(sk)[None, :] - jnp.arange(sq)[:, None]
        top = native_band(sq, sk, alignment)
        band = d_ij <= top
        if call.window is not None:
            band &= d_ij > top - call.window
        ok = ok & band[None, None]
    if call.kv_seqlen is not None:
        ok = ok & (jnp.arange(sk)[None, :] < call.kv_seqlen[:, None])[:, None, None, :]
    logits = jnp.where(ok, logits, -1e30)
    lse = jax.nn.logsumexp(logits, axis=-1)
    p = jnp.exp(logits - lse[..., None]).reshape(b, hkv, g, sq, sk)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    out = out.reshape(b, sq, hq, v.shape[-1]).astype(q.dtype)
    return finish(call, out, lse if call.return_lse else None)
