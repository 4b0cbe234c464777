"""An independent float64 NumPy attention, forward and backward, for testing the core.

Written from the documented semantics alone (docs/semantics.md): no jaxattn code (masks included) is used, so
the `xla` backend is checked against something that could not share its mistakes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Rules:
    """Masking rules, each as docs/semantics.md states it. None = not applied."""

    causal_offset: int | None = None  # j <= i + offset
    window: tuple[int, int] | None = None  # i' - left <= j <= i' + right, i' = i + kv - q
    chunk: int | None = None  # j <= i' and j // c == i' // c, i' = i + kv - q
    q_segments: np.ndarray | None = None  # [B, Sq]
    kv_segments: np.ndarray | None = None  # [B, Skv]
    q_lengths: np.ndarray | None = None  # [B]
    kv_lengths: np.ndarray | None = None  # [B]
    dense: np.ndarray | None = None  # bool, broadcastable to [B, H, Sq, Skv]
    positions: np.ndarray | None = None  # [B, Sq]: query i stands at p; p - left <= j <= p + right
    positions_window: tuple[int | None, int] = (None, 0)  # (left, right); left None = unbounded


def allowed(rules: Rules, b: int, h: int, q_len: int, kv_len: int) -> np.ndarray:
    ok = np.ones((q_len, kv_len), bool)
    shift = kv_len - q_len
    for i in range(q_len):
        for j in range(kv_len):
            if rules.causal_offset is not None and j > i + rules.causal_offset:
                ok[i, j] = False
            if rules.window is not None and not (i + shift - rules.window[0] <= j <= i + shift + rules.window[1]):
                ok[i, j] = False
            if rules.chunk is not None and not (j <= i + shift and j // rules.chunk == (i + shift) // rules.chunk):
                ok[i, j] = False
            if rules.q_segments is not None and rules.q_segments[b, i] != rules.kv_segments[b, j]:
                ok[i, j] = False
            if rules.positions is not None:
                p, (left, right) = rules.positions[b, i], rules.positions_window
                if j > p + right or (left is not None and j < p - left):
                    ok[i, j] = False
            if rules.q_lengths is not None and i >= rules.q_lengths[b]:
                ok[i, j] = False
            if rules.kv_lengths is not None and j >= rules.kv_lengths[b]:
                ok[i, j] = False
    if rules.dense is not None:
        d = rules.dense.reshape((1,) * (4 - rules.dense.ndim) + rules.dense.shape)
        ok &= np.broadcast_to(d[min(b, d.shape[0] - 1), min(h, d.shape[1] - 1)], ok.shape)
    return ok


def attention(q, k, v, rules: Rules, *, scale=None, bias=None, soft_cap=None, sinks=None):
    """Forward: `out [B,Sq,Hq,Dv]`, `lse [B,Hq,Sq]` and the saved values for `backward`."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_, sq, hq, d = q.shape
    _, skv, hkv, dv = v.shape
    group = hq // hkv
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.zeros((b_, sq, hq, dv))
    lse = np.full((b_, hq, sq), -np.inf)
    saved = {}
    for b in range(b_):
        for h in range(hq):
            kh = h // group
            raw = scale * q[b, :, h] @ k[b, :, kh].T
            if bias is not None:
                bb = np.asarray(bias, np.float64)
                bb = bb.reshape((1,) * (4 - bb.ndim) + bb.shape)
                raw = raw + np.broadcast_to(bb[min(b, bb.shape[0] - 1), min(h, bb.shape[1] - 1)], raw.shape)
            capped = soft_cap * np.tanh(raw / soft_cap) if soft_cap else raw
            ok = allowed(rules, b, h, sq, skv)
            logits = np.where(ok, capped, -np.inf)
            has_key = ok.any(axis=1)
            m = np.where(has_key, logits.max(axis=1, initial=-np.inf), 0.0)
            if sinks is not None:
                m = np.where(has_key, np.maximum(m, sinks[h]), 0.0)
            e = np.where(ok, np.exp(logits - m[:, None]), 0.0)
            denom = e.sum(axis=1) + (np.exp(sinks[h] - m) if sinks is not None else 0.0)
            denom = np.where(has_key, denom, 1.0)
            p = e / denom[:, None]
            out[b, :, h] = p @ v[b, :, kh]
            lse[b, h] = np.where(has_key, m + np.log(denom), -np.inf)
            saved[b, h] = (raw, p, has_key)
    return out, lse, saved


def backward(q, k, v, rules: Rules, d_out, d_lse=None, *, scale=None, bias=None, soft_cap=None, sinks=None):
    """Gradients w.r.t. q, k, v, bias (full [B,Hq,Sq,Skv]) and sinks, by hand."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    d_out = np.asarray(d_out, np.float64)
    out, lse, saved = attention(q, k, v, rules, scale=scale, bias=bias, soft_cap=soft_cap, sinks=sinks)
    b_, sq, hq, d = q.shape
    _, skv, hkv, _ = v.shape
    group = hq // hkv
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dbias = np.zeros((b_, hq, sq, skv))
    dsinks = np.zeros(hq)
    for b in range(b_):
        for h in range(hq):
            kh = h // group
            raw, p, has_key = saved[b, h]
            do = d_out[b, :, h]
            dl = np.zeros(sq) if d_lse is None else np.where(has_key, np.asarray(d_lse, np.float64)[b, h], 0.0)
            dv[b, :, kh] += p.T @ do
            dp = do @ v[b, :, kh].T
            delta = (do * out[b, :, h]).sum(axis=1)
            ds = p * (dp - delta[:, None] + dl[:, None])
            if soft_cap:
                ds = ds * (1.0 - np.tanh(raw / soft_cap) ** 2)
            dbias[b, h] = ds
            dq[b, :, h] = scale * ds @ k[b, :, kh]
            dk[b, :, kh] += scale * ds.T @ q[b, :, h]
            if sinks is not None:
                p_sink = np.where(has_key, np.exp(sinks[h] - np.where(has_key, lse[b, h], 0.0)), 0.0)
                dsinks[h] += (p_sink * (dl - delta)).sum()
    return dq, dk, dv, dbias, dsinks


def paged(query, key_pages, value_pages, kv_lengths, page_indices, cu_q_lens=None, *, scale=None,
          window=None, soft_cap=None, sinks=None):
    """Paged attention by rebuilding each sequence's cache and looping over query tokens."""
    query = np.asarray(query, np.float64)
    kp, vp = np.asarray(key_pages, np.float64), np.asarray(value_pages, np.float64)
    tokens, hq, d = query.shape
    hkv = kp.shape[2]
    group = hq // hkv
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    num_seqs = len(kv_lengths)
    if cu_q_lens is None:
        cu_q_lens = np.arange(num_seqs + 1)
    out = np.zeros((tokens, hq, vp.shape[-1]))
    for s in range(num_seqs):
        length = int(kv_lengths[s])
        keys = np.concatenate([kp[p] for p in page_indices[s]])[:length]
        values = np.concatenate([vp[p] for p in page_indices[s]])[:length]
        n = int(cu_q_lens[s + 1] - cu_q_lens[s])
        for t in range(int(cu_q_lens[s]), int(cu_q_lens[s + 1])):
            pos = length - (int(cu_q_lens[s + 1]) - t)
            for h in range(hq):
                js = [j for j in range(length) if j <= pos and (window is None or j >= pos - window[0])]
                if not js or n == 0:
                    continue
                raw = scale * keys[js, h // group] @ query[t, h]
                logits = soft_cap * np.tanh(raw / soft_cap) if soft_cap else raw
                m = logits.max() if sinks is None else max(logits.max(), sinks[h])
                e = np.exp(logits - m)
                denom = e.sum() + (np.exp(sinks[h] - m) if sinks is not None else 0.0)
                out[t, h] = (e / denom) @ values[js, h // group]
    return out
