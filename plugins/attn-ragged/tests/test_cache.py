"""update_paged_kv_cache (an alias of jaxattn.update_paged_cache): new tokens land in the page/slot
docs/paged.md assigns; nothing else changes. Quantized writes are tested in the core (test_quant.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn_ragged import token_slots, update_paged_kv_cache
from jaxattn_ragged._testing import paged_problem


def _expected(pages, new, lengths, counts, table, page_size, decode=False):
    pages = np.array(pages)
    t = 0
    for s, (n, c) in enumerate(zip(lengths, counts)):
        t = s if decode else t  # decode: token s is sequence s's
        for i in range(c):
            pos = n - c + i
            pages[table[s, pos // page_size], pos % page_size] = new[t]
            t += 1
    return pages


def test_ragged_write_then_attend():
    lengths, counts = [37, 5, 0, 20], [4, 5, 0, 1]
    args = paged_problem(0, lengths, counts, page_size=8, pad_tokens=3)
    tokens = args["query"].shape[0]
    k_new = jax.random.normal(jax.random.PRNGKey(1), (tokens, 2, 32))
    v_new = jax.random.normal(jax.random.PRNGKey(2), (tokens, 2, 32))
    kp, vp = update_paged_kv_cache(args["key_pages"], args["value_pages"], k_new, v_new,
                                   args["kv_lengths"], args["page_indices"], args["cu_q_lens"])
    table = np.asarray(args["page_indices"])
    np.testing.assert_array_equal(np.asarray(kp), _expected(args["key_pages"], np.asarray(k_new), lengths, counts,
                                                            table, 8))
    np.testing.assert_array_equal(np.asarray(vp), _expected(args["value_pages"], np.asarray(v_new), lengths, counts,
                                                            table, 8))


def test_decode_write_skips_empty_sequences():
    lengths = [9, 0, 16]
    args = paged_problem(3, lengths, page_size=8)
    k_new = jax.random.normal(jax.random.PRNGKey(4), (3, 2, 32)).astype(jnp.float32)
    kp, vp = jax.jit(update_paged_kv_cache)(args["key_pages"], args["value_pages"], k_new, k_new,
                                            args["kv_lengths"], args["page_indices"])
    table = np.asarray(args["page_indices"])
    want = _expected(args["key_pages"], np.asarray(k_new), lengths, [1, 0, 1], table, 8, decode=True)
    np.testing.assert_array_equal(np.asarray(kp), want)
    want_v = _expected(args["value_pages"], np.asarray(k_new), lengths, [1, 0, 1], table, 8, decode=True)
    np.testing.assert_array_equal(np.asarray(vp), want_v)


def test_the_plugin_names_are_the_cores():
    from jaxattn.paged_cache import token_slots as core_slots

    assert update_paged_kv_cache is jaxattn.update_paged_cache and token_slots is core_slots
