"""`AttentionRequest`: the static facts about a call that `supports()` checks.

Built from shapes and dtypes only (never array values), so selection happens at trace
time and costs nothing under `jax.jit`. Requests are hashable: selections are cached.
"""

from __future__ import annotations

from dataclasses import dataclass

from .inputs import AttentionInputs, PagedAttentionInputs
from .masks import Mask, mask_parts

MODES = ("train", "prefill", "decode")
OPS = ("attention", "paged_attention")
KV_SCALES = ("none", "scalar", "per_token")


@dataclass(frozen=True)
class PagedLayout:
    """Shape of a paged KV cache: `[num_pages, page_size, kv_heads, head_dim]` pages."""

    num_pages: int
    page_size: int
    pages_per_seq: int
    num_seqs: int
    ragged: bool  # True when queries come as a ragged batch with cu_q_lens


@dataclass(frozen=True)
class AttentionRequest:
    """What a backend must be able to do to serve one call.

    `mask_kinds` names the mask kinds involved ("causal", "sliding_window",
    "chunked_causal", "segment", "dense", "full"; "or" when masks are combined with `|`).
    `needs_grad` is True in mode "train" unless the metadata says otherwise.
    `band` is `(lo, hi)`, the static range of `j - i` that the mask's structural parts
    (causal, window, chunked) allow (None for an unbounded side), and `chunk` is
    `(chunk_size, offset)`; both None when the mask has no such part or uses `|`.
    They let `supports()` judge exact offsets (e.g. top-left vs bottom-right causal).
    `kv_scale` says how a paged cache is scaled: "none", "scalar" (one scale for the
    whole cache) or "per_token" (per token and head; the finer of `k_scale`/`v_scale`);
    with `kv_dtype` ("int8", "float8_e4m3fn", ...) it tells a backend what it must dequantize.
    """

    op: str = "attention"
    batch: int = 1
    q_len: int = 1
    kv_len: int = 1
    num_q_heads: int = 1
    num_kv_heads: int = 1
    head_dim: int = 64
    value_head_dim: int = 64
    dtype: str = "float32"
    kv_dtype: str = "float32"
    mask_kinds: frozenset[str] = frozenset()
    has_bias: bool = False
    logits_soft_cap: bool = False
    has_sinks: bool = False
    dropout: bool = False
    q_seq_lengths: bool = False
    kv_seq_lengths: bool = False
    return_lse: bool = False
    needs_grad: bool = False
    mode: str = "train"
    paged: PagedLayout | None = None
    band: tuple[int | None, int | None] | None = None
    chunk: tuple[int, int] | None = None
    kv_scale: str = "none"

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.kv_scale not in KV_SCALES:
            raise ValueError(f"kv_scale must be one of {KV_SCALES}, got {self.kv_scale!r}")

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads != self.num_q_heads

    @property
    def has_segments(self) -> bool:
        return "segment" in self.mask_kinds

    @property
    def is_causal(self) -> bool:
        return "causal" in self.mask_kinds

    def describe(self) -> str:
        """One line: shapes, dtype and features, for explanations and tables."""
        shape = (
            f"{self.op} b={self.batch} q={self.q_len} kv={self.kv_len} "
            f"hq={self.num_q_heads} hkv={self.num_kv_heads} d={self.head_dim}"
        )
        if self.value_head_dim != self.head_dim:
            shape += f" dv={self.value_head_dim}"
        flags = sorted(self.mask_kinds)
        for name in ("has_bias", "logits_soft_cap", "has_sinks", "dropout", "q_seq_lengths",
                     "kv_seq_lengths", "return_lse", "needs_grad"):
            if getattr(self, name):
                flags.append(name.removeprefix("has_"))
        if self.kv_scale != "none":
            flags.append(f"kv_scale={self.kv_scale}")
        if self.paged:
            flags.append(f"page_size={self.paged.page_size}")
            flags.append("ragged" if self.paged.ragged else "decode")
        dtype = self.dtype if self.kv_dtype == self.dtype else f"{self.dtype}/kv {self.kv_dtype}"
        return f"{shape} {dtype} mode={self.mode} [{', '.join(flags) or 'no mask'}]"

    @classmethod
    def from_inputs(
        cls, inputs: AttentionInputs, *, mode: str | None = None, needs_grad: bool | None = None
    ) -> AttentionRequest:
        b, q_len, hq, d = inputs.query.shape
        _, kv_len, hkv, _ = inputs.key.shape
        mode = mode or ("decode" if q_len == 1 else "train")
        band, chunk = static_band(inputs.mask, q_len, kv_len)
        return cls(
            op="attention",
            batch=b,
            q_len=q_len,
            kv_len=kv_len,
            num_q_heads=hq,
            num_kv_heads=hkv,
            head_dim=d,
            value_head_dim=inputs.value.shape[-1],
            dtype=str(inputs.query.dtype),
            kv_dtype=str(inputs.key.dtype),
            mask_kinds=inputs.mask.kinds() if inputs.mask is not None else frozenset(),
            has_bias=inputs.bias is not None,
            logits_soft_cap=inputs.logits_soft_cap is not None,
            has_sinks=inputs.sinks is not None,
            dropout=inputs.dropout_rate > 0.0,
            q_seq_lengths=inputs.q_seq_lengths is not None,
            kv_seq_lengths=inputs.kv_seq_lengths is not None,
            return_lse=inputs.return_lse,
            needs_grad=(mode == "train") if needs_grad is None else needs_grad,
            mode=mode,
            band=band,
            chunk=chunk,
        )

    @classmethod
    def from_paged_inputs(cls, inputs: PagedAttentionInputs, *, mode: str | None = None) -> AttentionRequest:
        tokens, hq, d = inputs.query.shape
        num_pages, page_size, hkv, _ = inputs.key_pages.shape
        num_seqs, pages_per_seq = inputs.page_indices.shape
        ragged = inputs.cu_q_lens is not None
        kinds = {"causal"} | ({"sliding_window"} if inputs.sliding_window else set())
        return cls(
            op="paged_attention",
            batch=num_seqs,
            q_len=tokens,
            kv_len=pages_per_seq * page_size,
            num_q_heads=hq,
            num_kv_heads=hkv,
            head_dim=d,
            value_head_dim=inputs.value_pages.shape[-1],
            dtype=str(inputs.query.dtype),
            kv_dtype=str(inputs.key_pages.dtype),
            mask_kinds=frozenset(kinds),
            logits_soft_cap=inputs.logits_soft_cap is not None,
            has_sinks=inputs.sinks is not None,
            kv_seq_lengths=True,
            needs_grad=False,
            mode=mode or ("prefill" if ragged else "decode"),
            paged=PagedLayout(num_pages, page_size, pages_per_seq, num_seqs, ragged),
            kv_scale=_scale_kind(inputs.k_scale, inputs.v_scale),
        )


def _scale_kind(*scales: object) -> str:
    ndims = [getattr(s, "ndim", 0) for s in scales if s is not None]
    if not ndims:
        return "none"
    return "per_token" if max(ndims) > 0 else "scalar"


def static_band(mask: Mask | None, q_len: int, kv_len: int) -> tuple[tuple[int | None, int | None] | None,
                                                                      tuple[int, int] | None]:
    """The structural band and chunk of `mask`, or (None, None) where there is none or `|` is used
    (`AttentionRequest.band` and `.chunk`)."""
    if mask is None or "or" in mask.kinds():
        return None, None
    if not mask.kinds() & {"causal", "sliding_window", "chunked_causal"}:
        return None, None
    try:
        parts = mask_parts(mask, q_len, kv_len)
    except ValueError:
        return None, None
    chunk = (parts.chunk_size, parts.chunk_offset) if parts.chunk_size is not None else None
    return (parts.band_lo, parts.band_hi), chunk
