"""The backends this plugin registers for op "paged_attention".

* `ragged_paged` (aliases `ragged_page_attention_v3`, `page_attention`): decode and
  ragged prefill+decode batches, one Pallas (Triton) launch on NVIDIA GPUs.
* `decode` (alias `autoregressive_decodeattn`): the same kernel in its decode layout (one
  query token per program, all query heads of a kv head in one tile, split-KV), for
  decode calls only (no `cu_q_lens`).

Both take `interpret=True` to run the kernel in the Pallas interpreter: then they accept
CPU (for tests; far too slow for real work). jax's TPU ragged paged attention kernel is
wrapped in `forward_tpu` but off by default (`enable_tpu=True` turns it on): jax 0.10.2's
TPU interpreter cannot run it on CPU, so CI cannot check it.

Settings (`metadata.operation_configs["ragged_paged"]` or `["decode"]`: a `RaggedConfig` /
`DecodeConfig` or a dict of its keys): `block_q`, `block_kv`, `num_splits` (0 = auto),
`num_warps`, `num_stages`, `target_programs`, and the switches `gather2d`, `mask_split`,
`two_tiles` (1/0), `int8_dots` (0/1/2: how many products run on int8 tensor cores for
int8 pages, see `kernel.KernelConfig`), `fp8_dots` (0/1: K·Qᵀ on float8 tensor cores for
float8_e4m3fn pages, Mosaic decode kernel only) and `mosaic` (1: decode calls on the Hopper kernel of
`mosaic_decode.py`; `jaxattn tune` tries it on a Hopper GPU where it serves the call; 2: that
kernel with two consumer warpgroups, `num_stages` even).
Measured tables (`tuning/*.json`, package data) are shipped through `jaxattn_tuning_tables`.

Quantized caches (int8 or float8_e4m3fn pages with `k_scale`/`v_scale`, per token and head
or scalar) run in the same GPU kernel, dequantized tile by tile (fp8 needs compute
capability 8.9); with no settings given, their decode calls on a Hopper GPU run the Mosaic
decode kernel (`mosaic_serves.ONE_BYTE_DECODE`: two consumers, K·Qᵀ in the pages' one-byte
dtype) wherever it serves the call. The TPU path takes 16-bit caches only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import jaxattn
from jaxattn import BackendConfig, Capabilities, Hardware, OperationImpl, OperationMetadata, Support
from jaxattn.inputs import PagedAttentionInputs
from jaxattn.request import AttentionRequest

from .kernel import DECODE_CONFIG, RAGGED_CONFIG, KernelConfig, is_pow2, paged_attention_kernel
from .tpu import tpu_paged_attention

KV_DTYPES = ("bfloat16", "float16", "float32", "int8", "float8_e4m3fn")
Q_DTYPES = ("bfloat16", "float16", "float32")
QUANT_DTYPES = ("int8", "float8_e4m3fn")
FP8_CAPABILITY = (8, 9)  # Triton converts float8_e4m3fn on Ada/Hopper and later
MIN_PAGE, MAX_PAGE = 8, 1024
MIN_DIM, MAX_DIM = 16, 256
MAX_GROUP = 64


@dataclass(frozen=True)
class RaggedConfig(BackendConfig):
    """Settings of `ragged_paged` (None: the kernel's default; see `kernel.KernelConfig`)."""

    backend = "ragged_paged"
    block_q: int | None = None
    block_kv: int | None = None
    num_splits: int | None = None  # 0: chosen from the grid and the GPU
    num_warps: int | None = None
    num_stages: int | None = None
    target_programs: int | None = None  # 0: 4 per SM
    gather2d: int | None = None  # switches, 1 or 0
    mask_split: int | None = None
    two_tiles: int | None = None
    int8_dots: int | None = None  # int8 pages: products on int8 tensor cores (0, 1: Q·Kᵀ, 2: both)
    fp8_dots: int | None = None  # float8 pages, Mosaic decode kernel: Q·Kᵀ on float8 tensor cores (0, 1)
    mosaic: int | None = None  # 1: decode on the Mosaic GPU kernel (mosaic_decode.py; Hopper); 2: two consumers

    def __post_init__(self) -> None:
        self.check_int("block_q", power_of_two=True)
        self.check_int("block_kv", minimum=16, power_of_two=True)
        for key in ("num_splits", "target_programs"):
            self.check_int(key, minimum=0)
        for key in ("num_warps", "num_stages"):
            self.check_int(key)
        for key in ("gather2d", "mask_split", "two_tiles"):
            self.check_choice(key, (0, 1))
        self.check_choice("int8_dots", (0, 1, 2))
        self.check_choice("fp8_dots", (0, 1))
        self.check_choice("mosaic", (0, 1, 2))


@dataclass(frozen=True)
class DecodeConfig(RaggedConfig):
    """Settings of `decode`: the same keys as `ragged_paged`."""

    backend = "decode"


def _window_left(inputs: PagedAttentionInputs) -> int | None:
    return None if inputs.sliding_window is None else int(inputs.sliding_window[0])


class RaggedPagedAttention(OperationImpl):
    """Paged-KV-cache attention in one Pallas (Triton) launch: decode and ragged prefill+decode."""

    name: ClassVar[str] = "ragged_paged"
    aliases: ClassVar[tuple[str, ...]] = ("ragged_page_attention_v3", "page_attention")
    op: ClassVar[str] = "paged_attention"
    platforms: ClassVar[tuple[str, ...]] = ("gpu", "tpu")
    priority: ClassVar[dict[str, int]] = {"gpu": 100, "tpu": 100}
    partitioning: ClassVar[str] = "shard"  # Pallas kernels: run per shard under plain jit
    config_class: ClassVar[type[BackendConfig] | None] = RaggedConfig
    kv_scales: ClassVar[bool] = True  # int8/fp8 pages with scales (GPU kernel; the TPU path says no)
    capabilities: ClassVar[Capabilities] = Capabilities(
        dtypes=Q_DTYPES, kv_dtypes=KV_DTYPES, mask_kinds=frozenset({"causal", "sliding_window"}),
        features=frozenset({"soft_cap", "sinks", "value_head_dim"}),
    )
    decode_only: ClassVar[bool] = False

    def __init__(self, *, interpret: bool = False, enable_tpu: bool = False,
                 config: KernelConfig | None = None, tpu_kernel: Any = None) -> None:
        self.interpret = interpret
        self.enable_tpu = enable_tpu
        if not enable_tpu:  # listed platforms: the TPU path is opt-in (see is_available)
            self.platforms = ("gpu",)  # type: ignore[misc]
        self.config = config
        self.tpu_kernel = tpu_kernel  # tests pass jax's reference implementation here

    # -- what it declares -------------------------------------------------------------
    def is_available(self, hardware: Hardware) -> Support:
        if self.interpret:
            return Support.yes()
        if hardware.platform == "cpu":
            return Support.no(f"{self.name} runs Pallas GPU kernels (and jax's TPU kernel); on CPU it runs only "
                              f"in the Pallas interpreter for tests ({type(self).__name__}(interpret=True)), far "
                              "too slow for real work: use backend 'xla'")
        if hardware.platform == "tpu" and not self.enable_tpu:
            return Support.no(f"{self.name}: jax's TPU ragged paged attention kernel is wrapped but unverified: "
                              "jax 0.10.2's TPU interpreter cannot run it on CPU (ReshapeTransform unsupported), "
                              f"so CI cannot check it; use backend 'xla' or {type(self).__name__}(enable_tpu=True)")
        if hardware.platform == "gpu" and not hardware.is_cuda:
            return Support.no(f"{self.name}: the Pallas Triton kernel is only built and tested for NVIDIA GPUs")
        return Support.yes()

    def extra_reasons(self, request: AttentionRequest, hardware: Hardware) -> list[str]:
        reasons = []
        if self.decode_only and request.paged is not None and request.paged.ragged:
            reasons.append(f"{self.name} serves decode calls (one query per sequence, no cu_q_lens); "
                           "use 'ragged_paged' for ragged prefill+decode batches")
        if request.paged is None:
            return reasons
        if request.kv_dtype in QUANT_DTYPES and request.kv_scale == "none":
            reasons.append(f"{self.name}: {request.kv_dtype} pages need their scales (k_scale/v_scale)")
        if hardware.platform == "tpu" and not self.interpret:
            return reasons + self._tpu_reasons(request)
        return reasons + self._gpu_reasons(request, hardware)

    def tuning_space(self, request: AttentionRequest, hardware: Hardware) -> list[dict[str, Any]]:
        """What `jaxattn tune` times: the defaults and, for a decode call on a Hopper GPU that the
        Mosaic decode kernel serves at the decode defaults' tiles, that kernel (`mosaic=1`)."""
        from .mosaic_serves import request_reasons

        space: list[dict[str, Any]] = [{}]
        if hardware.is_hopper and not self.interpret and request.paged is not None and not request.paged.ragged:
            if not request_reasons(request, DECODE_CONFIG.block_kv, DECODE_CONFIG.num_stages):
                space.append({"mosaic": 1})
        return space

    def _gpu_reasons(self, request: AttentionRequest, hardware: Hardware) -> list[str]:
        reasons = []
        paged = request.paged
        assert paged is not None
        ps = paged.page_size
        if not (is_pow2(ps) and MIN_PAGE <= ps <= MAX_PAGE):
            reasons.append(f"{self.name}: page_size {ps} unsupported (a power of two from {MIN_PAGE} to {MAX_PAGE})")
        for label, dim in (("head_dim", request.head_dim), ("value head_dim", request.value_head_dim)):
            if not (is_pow2(dim) and MIN_DIM <= dim <= MAX_DIM):
                reasons.append(f"{self.name}: {label} {dim} unsupported (a power of two from {MIN_DIM} to {MAX_DIM})")
        group = request.num_q_heads // max(1, request.num_kv_heads)
        if group > MAX_GROUP:
            reasons.append(f"{self.name}: {group} query heads per kv head unsupported (at most {MAX_GROUP})")
        capability = hardware.compute_capability
        if hardware.platform == "gpu" and capability is not None and capability < (8, 0):
            reasons.append(f"{self.name}: needs compute capability >= 8.0 (bf16 tensor cores), got "
                           f"{hardware.compute_capability}")
        elif (request.kv_dtype == "float8_e4m3fn" and hardware.platform == "gpu" and capability is not None
              and capability < FP8_CAPABILITY):
            reasons.append(f"{self.name}: float8_e4m3fn pages need compute capability >= 8.9 (Triton's fp8 "
                           f"conversion), got {capability}; use int8 pages")
        return reasons

    def _tpu_reasons(self, request: AttentionRequest) -> list[str]:
        reasons = []
        if request.has_sinks:
            reasons.append(f"{self.name} on TPU: jax's ragged paged attention kernel has no sinks")
        if request.value_head_dim != request.head_dim:
            reasons.append(f"{self.name} on TPU: value head_dim must equal head_dim (combined K/V pages)")
        if request.head_dim % 128:
            reasons.append(f"{self.name} on TPU: head_dim must be a multiple of 128, got {request.head_dim}")
        if request.kv_dtype == "float32" or request.kv_dtype != request.dtype:
            reasons.append(f"{self.name} on TPU: query and cache must share one 16-bit dtype (no quantized cache)")
        if request.kv_scale != "none":
            reasons.append(f"{self.name} on TPU: no k_scale/v_scale (jax's kernel is wrapped for 16-bit caches)")
        return reasons

    # -- what it computes -------------------------------------------------------------
    def kernel_config(self, inputs: PagedAttentionInputs, metadata: OperationMetadata) -> KernelConfig:
        """The call's launch settings: the instance's config, else the call's settings for this
        backend over the defaults; with no settings given, decode over int8/fp8 pages on a Hopper
        GPU takes the Mosaic decode kernel's (`mosaic_serves.ONE_BYTE_DECODE`) where it serves
        the call."""
        if self.config is not None:
            return self.config
        decode = inputs.cu_q_lens is None
        base = DECODE_CONFIG if decode else RAGGED_CONFIG
        given = metadata.operation_config(self.name, self.config_class or RaggedConfig).to_dict()
        if decode and not given and not self.interpret and jaxattn.hardware.current().is_hopper:
            from .mosaic_serves import one_byte_decode_config

            changes = one_byte_decode_config(inputs.query, inputs.key_pages, inputs.value_pages,
                                             window_left=_window_left(inputs), soft_cap=inputs.logits_soft_cap,
                                             sinks=inputs.sinks)
            base = base.replace(**changes) if changes else base
        return base.replace(**given)

    def _run_kernel(self, inputs: PagedAttentionInputs, metadata: OperationMetadata):
        cfg = self.kernel_config(inputs, metadata)
        if self.interpret and cfg.num_splits == 0:  # the interpreter runs programs one by one: no auto split
            cfg = cfg.replace(num_splits=1)
        if cfg.mosaic:
            return self._run_mosaic(inputs, cfg)
        return paged_attention_kernel(
            inputs.query, inputs.key_pages, inputs.value_pages, inputs.kv_lengths, inputs.page_indices,
            inputs.cu_q_lens, scale=inputs.scale, window_left=_window_left(inputs),
            soft_cap=inputs.logits_soft_cap, sinks=inputs.sinks, k_scale=inputs.k_scale, v_scale=inputs.v_scale,
            config=cfg, interpret=self.interpret)

    def _run_mosaic(self, inputs: PagedAttentionInputs, cfg: KernelConfig):
        """The decode call on `mosaic_decode.py`'s kernel (config `mosaic=1`, or 2 for two consumer
        warpgroups); ValueError with every reason where it cannot serve the call (never a silent
        fallback)."""
        from .mosaic_decode import mosaic_paged_decode
        from .mosaic_serves import mosaic_reasons

        reasons = mosaic_reasons(inputs.query, inputs.key_pages, inputs.value_pages, cu_q_lens=inputs.cu_q_lens,
                                 window_left=_window_left(inputs), soft_cap=inputs.logits_soft_cap,
                                 sinks=inputs.sinks, block_kv=cfg.block_kv, stages=cfg.num_stages,
                                 int8_dots=cfg.int8_dots, fp8_dots=cfg.fp8_dots, consumers=cfg.mosaic)
        if self.interpret:
            reasons.append("the Mosaic decode kernel runs on a Hopper GPU only (no interpreter)")
        elif not (here := jaxattn.hardware.current()).is_hopper:
            reasons.append(f"the Mosaic decode kernel runs on a Hopper GPU only (compute capability 9.x), "
                           f"not on {here.device_kind} ({here.compute_capability})")
        if reasons:
            raise ValueError(f"{self.name}: mosaic={cfg.mosaic}: " + "; ".join(reasons))
        return mosaic_paged_decode(inputs.query, inputs.key_pages, inputs.value_pages, inputs.kv_lengths,
                                   inputs.page_indices, scale=inputs.scale, k_scale=inputs.k_scale,
                                   v_scale=inputs.v_scale, config=cfg)

    def forward_gpu(self, inputs: PagedAttentionInputs, metadata: OperationMetadata) -> Any:
        return self._run_kernel(inputs, metadata)

    def forward_cpu(self, inputs: PagedAttentionInputs, metadata: OperationMetadata) -> Any:
        if not self.interpret:
            raise RuntimeError(str(self.is_available(Hardware.cpu())))
        return self._run_kernel(inputs, metadata)

    def forward_tpu(self, inputs: PagedAttentionInputs, metadata: OperationMetadata) -> Any:
        raw = metadata.get_operation_config(self.name + "_tpu")
        out = tpu_paged_attention(
            inputs.query, inputs.key_pages, inputs.value_pages, inputs.kv_lengths, inputs.page_indices,
            inputs.cu_q_lens, scale=inputs.scale, window_left=_window_left(inputs),
            soft_cap=inputs.logits_soft_cap, kernel=self.tpu_kernel, **raw)
        return out, None


class DecodeAttention(RaggedPagedAttention):
    """The paged kernel's decode layout: one query per sequence, split-KV; decode calls only."""

    name: ClassVar[str] = "decode"
    aliases: ClassVar[tuple[str, ...]] = ("autoregressive_decodeattn",)
    priority: ClassVar[dict[str, int]] = {"gpu": 90, "tpu": 90}
    partitioning: ClassVar[str] = "shard"  # Pallas kernels: run per shard under plain jit
    config_class: ClassVar[type[BackendConfig] | None] = DecodeConfig
    decode_only: ClassVar[bool] = True


@jaxattn.hookimpl
def jaxattn_register_backends() -> list[OperationImpl]:
    return [RaggedPagedAttention(), DecodeAttention()]


@jaxattn.hookimpl
def jaxattn_tuning_tables() -> list:
    """The measured tables this package ships (`jaxattn_ragged/tuning/*.json`, one per device
    kind, written by `jaxattn tune --preset serve --json-out ...`): `auto` ranks by them until
    the user's own `jaxattn tune` cache covers a call."""
    return jaxattn.tuning.package_tables("jaxattn_ragged")
