"""The conformance suite: does a backend compute what `xla` computes, for all it accepts?

For each case and dtype the backend is asked `supports()`. If it accepts, its forward
(and, when it declares a backward pass, its gradients with respect to query, key,
value, bias and sinks) are compared with the `xla` backend run in float32 on the same
values, by relative error `‖out − ref‖ / ‖ref‖`. If it rejects, the rejection and its
reasons are recorded; `expect_supported` turns the rejection of named cases into
failures, so a plugin's tests pin what it claims.

Tolerances (docs/testing-a-backend.md): float32 1e-4; bf16/fp16 1e-2 forward. Gradients of bf16/fp16
inputs get 2e-2: the probabilities and dS tiles are rounded to the input dtype before
their matrix products, which costs about twice the forward error.

Quantized pages (int8, float8_e4m3fn with scales) are held to the same tolerance against
the reference run on the *dequantized* cache (what the backend was given), and their
error against the unquantized cache they were made from is recorded as `vs_unquantized`
(what a user of a quantized cache loses), bounded by `QUANT_TOL`: int8 2e-2; float8_e4m3fn
5e-2, since its 3 mantissa bits alone cost about 3% on random normal data (the format,
not the kernel: the `xla` reference loses the same).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import hardware as _hardware
from ..backends.xla import XlaAttention, XlaPagedAttention
from ..hardware import Hardware
from ..inputs import AttentionInputs
from ..metadata import OperationMetadata
from ..operation import OperationImpl
from ..registry import default_registry
from ..request import AttentionRequest
from ..validation import build_attention_inputs, build_paged_inputs
from .cases import UNQUANTIZED, Case, Shape, all_cases

FORWARD_TOL = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}
GRAD_TOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}
QUANT_TOL = {"int8": 2e-2, "float8_e4m3fn": 5e-2}
NEG_INF_LIMIT = -1e20  # an lse at or below this counts as -inf (kernels may use a finite floor)

_ATTENTION_DEFAULTS: dict[str, Any] = dict(
    bias=None, mask=None, scale=None, is_causal=False, sliding_window=None, segment_ids=None,
    query_seq_lengths=None, key_value_seq_lengths=None, logits_soft_cap=None, sinks=None,
    dropout_rate=0.0, dropout_rng=None, return_lse=False,
)
_PAGED_DEFAULTS: dict[str, Any] = dict(
    cu_q_lens=None, scale=None, sliding_window=None, logits_soft_cap=None, sinks=None,
)


def relative_error(x: Any, ref: Any) -> float:
    """`‖x − ref‖ / ‖ref‖` in float64 (absolute error when ref is all zeros); inf on NaN."""
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    if not np.all(np.isfinite(x)):
        return float("inf")
    norm = np.linalg.norm(ref)
    diff = np.linalg.norm(x - ref)
    return float(diff / norm) if norm > 0 else float(diff)


def lse_error(lse: Any, ref: Any) -> float:
    """Relative error over rows with keys; inf if -inf rows (no key) do not match."""
    lse = np.asarray(lse, np.float64)
    ref = np.asarray(ref, np.float64)
    empty = ~np.isfinite(ref)
    if np.any(np.isnan(lse)) or not np.all(lse[empty] <= NEG_INF_LIMIT):
        return float("inf")
    if np.any(~np.isfinite(lse[~empty])):
        return float("inf")
    return relative_error(lse[~empty], ref[~empty]) if np.any(~empty) else 0.0


def build_inputs(op: str, args: dict[str, Any], metadata: OperationMetadata) -> Any:
    """Turn a case's arguments into normalized inputs, exactly as the public API does."""
    args = dict(args)
    if op == "attention":
        q, k, v = args.pop("query"), args.pop("key"), args.pop("value")
        kwargs = {**_ATTENTION_DEFAULTS, **args}
        bias, mask = kwargs.pop("bias"), kwargs.pop("mask")
        return build_attention_inputs(q, k, v, bias, mask, metadata=metadata, **kwargs)
    names = ("query", "key_pages", "value_pages", "kv_lengths", "page_indices")
    positional = [args.pop(n) for n in names]
    return build_paged_inputs(*positional, metadata=metadata, **{**_PAGED_DEFAULTS, **args})


@dataclass
class CaseResult:
    case: str
    dtype: str
    status: str  # "pass", "fail", "rejected", "error"
    errors: dict[str, float] = field(default_factory=dict)
    tolerance: float = 0.0
    backward: bool = False
    detail: str = ""

    def line(self) -> str:
        errs = " ".join(f"{k}={v:.1e}" for k, v in self.errors.items())
        grad = " +grad" if self.backward else ""
        return f"{self.status:8s} {self.case:22s} {self.dtype:8s}{grad:6s} {errs} {self.detail}".rstrip()


@dataclass
class ConformanceReport:
    backend: str
    hardware: Hardware
    results: list[CaseResult]
    expected: tuple[str, ...] = ()

    @property
    def failures(self) -> list[CaseResult]:
        bad = [r for r in self.results if r.status in ("fail", "error")]
        bad += [r for r in self.results if r.status == "rejected" and r.case in self.expected]
        return bad

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        head = f"conformance of {self.backend!r} on {self.hardware.platform} ({self.hardware.device_kind})"
        counts = {s: sum(r.status == s for r in self.results) for s in ("pass", "fail", "rejected", "error")}
        summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        return "\n".join([head, *(r.line() for r in self.results), summary])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (what `jaxattn check --json` prints); a non-finite error is null."""
        def finite(x: float) -> float | None:
            return x if np.isfinite(x) else None

        return {
            "backend": self.backend, "ok": self.ok,
            "hardware": {"platform": self.hardware.platform, "device_kind": self.hardware.device_kind},
            "expected": list(self.expected),
            "results": [{"case": r.case, "dtype": r.dtype, "status": r.status, "backward": r.backward,
                         "errors": {k: finite(v) for k, v in r.errors.items()}, "tolerance": r.tolerance,
                         "detail": r.detail} for r in self.results],
        }

    def assert_ok(self) -> None:
        if not self.ok:
            lines = [r.line() + (" (expected to be supported)" if r.status == "rejected" else "")
                     for r in self.failures]
            raise AssertionError(f"{self.backend} fails conformance:\n" + "\n".join(lines))


def _resolve(backend: str | OperationImpl, op: str | None) -> OperationImpl:
    if isinstance(backend, OperationImpl):
        return backend
    return default_registry().get(backend, op or "attention")


def _to_float32(inputs: Any) -> Any:
    if isinstance(inputs, AttentionInputs):
        cast = {n: getattr(inputs, n).astype(jnp.float32) for n in ("query", "key", "value")}
        if inputs.bias is not None:
            cast["bias"] = inputs.bias.astype(jnp.float32)
        return inputs.replace(**cast)
    return inputs.replace(query=inputs.query.astype(jnp.float32),
                          key_pages=inputs.key_pages.astype(jnp.float32),
                          value_pages=inputs.value_pages.astype(jnp.float32))


def _call(impl: OperationImpl, metadata: OperationMetadata, hardware: Hardware) -> Any:
    return jax.jit(lambda inputs: impl(inputs, metadata, hardware))


@jax.jit
def _reference_call(inputs: Any) -> tuple[jax.Array, jax.Array]:
    """The xla reference, jitted once per process: runs of one case on one shape share one
    compilation, whatever the dtype (the reference always gets float32 inputs)."""
    impl = XlaAttention() if isinstance(inputs, AttentionInputs) else XlaPagedAttention()
    return impl(inputs, OperationMetadata(), Hardware.cpu())


def _reference(inputs: Any) -> tuple[jax.Array, jax.Array]:
    if isinstance(inputs, AttentionInputs):
        inputs = inputs.replace(return_lse=True)
    return _reference_call(_to_float32(inputs))


_DIFF = ("query", "key", "value", "bias", "sinks")
_GRAD_LABELS = {"query": "dq", "key": "dk", "value": "dv", "bias": "dbias", "sinks": "dsinks"}


def _vjp_of(impl: OperationImpl, metadata: OperationMetadata, hardware: Hardware) -> Any:
    """(inputs, cotangent) -> gradients w.r.t. query, key, value, bias and sinks; a
    cotangent pair (d_out, d_lse) differentiates the lse too."""

    def grads(inputs: AttentionInputs, cotangent: Any) -> dict[str, Any]:
        with_lse = isinstance(cotangent, tuple)
        primals = {n: getattr(inputs, n) for n in _DIFF if getattr(inputs, n) is not None}

        def f(p: dict[str, Any]) -> Any:
            out, lse = impl(inputs.replace(**p), metadata, hardware)
            return (out, lse) if with_lse else out

        _, vjp = jax.vjp(f, primals)
        return vjp(cotangent)[0]

    return grads


_reference_vjp = jax.jit(_vjp_of(XlaAttention(), OperationMetadata(), Hardware.cpu()))


def _cotangent(inputs: AttentionInputs, d_out: jax.Array, d_lse: jax.Array | None) -> Any:
    d_out = d_out.astype(inputs.value.dtype)
    return d_out if d_lse is None else (d_out, d_lse)


def _gradients(impl: OperationImpl, inputs: AttentionInputs, metadata: OperationMetadata,
               hardware: Hardware, d_out: jax.Array, d_lse: jax.Array | None) -> dict[str, Any]:
    """VJP of `impl`; every array is a jit argument (no constants to fold)."""
    return jax.jit(_vjp_of(impl, metadata, hardware))(inputs, _cotangent(inputs, d_out, d_lse))


def _reference_gradients(inputs: AttentionInputs, d_out: jax.Array, d_lse: jax.Array | None) -> dict[str, Any]:
    """VJP of the xla reference in float32 (compiled once per process, like `_reference`)."""
    inputs = _to_float32(inputs)
    return _reference_vjp(inputs, _cotangent(inputs, d_out, d_lse))


def check_case(impl: OperationImpl, case: Case, *, hardware: Hardware, dtype: Any,
               grads: bool = True, shape: Shape = Shape(), metadata: OperationMetadata | None = None,
               seed: int = 0) -> CaseResult:
    """Run one case on one dtype; never raises for a backend failure (status "error")."""
    metadata = metadata or OperationMetadata()
    dtype_name = jnp.dtype(dtype).name
    key = jax.random.PRNGKey(seed + zlib.crc32(case.name.encode()))
    args = case.build(key, jnp.dtype(dtype), shape)
    unquantized = args.pop(UNQUANTIZED, None)
    inputs = build_inputs(case.op, args, metadata)
    if case.op == "attention":
        want_grad = grads and case.grad
        request = AttentionRequest.from_inputs(inputs, mode="train" if want_grad else "prefill",
                                               needs_grad=want_grad)
    else:
        want_grad = False
        request = AttentionRequest.from_paged_inputs(inputs)
    declared = impl.declared_reasons(request)
    if declared:
        return CaseResult(case.name, dtype_name, "rejected", detail="; ".join(declared))
    verdict = impl.is_available(hardware) & impl.supports(request, hardware)
    if not verdict and want_grad:
        forward_only = AttentionRequest.from_inputs(inputs, mode="prefill", needs_grad=False)
        if impl.is_available(hardware) & impl.supports(forward_only, hardware):
            want_grad, verdict = False, impl.supports(forward_only, hardware)
    if not verdict:
        return CaseResult(case.name, dtype_name, "rejected", detail="; ".join(verdict.reasons))
    try:
        if case.name == "dropout":
            return _check_dropout(impl, case, inputs, metadata, hardware, dtype_name, want_grad)
        return _compare(impl, case, inputs, metadata, hardware, dtype_name, want_grad, key, unquantized)
    except Exception as err:  # noqa: BLE001 - a crash is a result, not the end of the suite
        return CaseResult(case.name, dtype_name, "error", backward=want_grad,
                          detail=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


def _compare(impl: OperationImpl, case: Case, inputs: Any, metadata: OperationMetadata,
             hardware: Hardware, dtype_name: str, want_grad: bool, key: jax.Array,
             unquantized: tuple[Any, Any] | None = None) -> CaseResult:
    out, lse = _call(impl, metadata, hardware)(inputs)
    ref_out, ref_lse = _reference(inputs)  # quantized pages: the dequantized reference
    tol = FORWARD_TOL.get(dtype_name, 1e-2)
    errors = {"out": relative_error(out, ref_out)}
    if case.op == "attention" and inputs.return_lse:
        errors["lse"] = float("inf") if lse is None else lse_error(lse, ref_lse)
    elif case.op == "paged_attention" and lse is not None:  # paged backends may return one
        errors["lse"] = lse_error(lse, ref_lse)
    if errors["out"] > tol or errors.get("lse", 0.0) > tol:
        return CaseResult(case.name, dtype_name, "fail", errors, tol, want_grad)
    if unquantized is not None:
        errors["vs_unquantized"], bar = _quantization_loss(out, inputs, unquantized)
        if errors["vs_unquantized"] > bar:
            return CaseResult(case.name, dtype_name, "fail", errors, tol, want_grad,
                              f"vs_unquantized over its bar {bar:.0e}")
    if want_grad:
        d_out = jax.random.normal(jax.random.fold_in(key, 99), ref_out.shape, jnp.float32)
        d_lse = None
        if inputs.return_lse:
            d_lse = jnp.where(jnp.isfinite(ref_lse),
                              jax.random.normal(jax.random.fold_in(key, 98), ref_lse.shape), 0.0)
        got = _gradients(impl, inputs, metadata, hardware, d_out, d_lse)
        ref = _reference_gradients(inputs, d_out, d_lse)
        gtol = GRAD_TOL.get(dtype_name, 2e-2)
        for name in got:
            errors[_GRAD_LABELS[name]] = relative_error(got[name], ref[name])
        if any(v > gtol for k, v in errors.items() if k not in ("out", "lse")):
            return CaseResult(case.name, dtype_name, "fail", errors, gtol, True)
    return CaseResult(case.name, dtype_name, "pass", errors, tol, want_grad)


def _quantization_loss(out: jax.Array, inputs: Any, unquantized: tuple[Any, Any]) -> tuple[float, float]:
    """The backend's output against the reference on the float cache the quantized one was
    made from (`vs_unquantized`), and its bar (`QUANT_TOL`)."""
    plain = inputs.replace(key_pages=unquantized[0], value_pages=unquantized[1], k_scale=None, v_scale=None)
    ref_out, _ = _reference(plain)
    return relative_error(out, ref_out), QUANT_TOL.get(inputs.key_pages.dtype.name, 2e-2)


def _check_dropout(impl: OperationImpl, case: Case, inputs: AttentionInputs, metadata: OperationMetadata,
                   hardware: Hardware, dtype_name: str, want_grad: bool) -> CaseResult:
    """Dropout patterns differ between backends: check determinism and effect, not values."""
    run = _call(impl, metadata, hardware)
    first, _ = run(inputs)
    second, _ = run(inputs)
    plain, _ = run(inputs.replace(dropout_rate=0.0, dropout_rng=None))
    errors = {"repeat": relative_error(second, first), "vs_no_dropout": relative_error(first, plain)}
    problems = []
    if errors["repeat"] != 0.0:
        problems.append("two calls with one key differ")
    if not 0.05 < errors["vs_no_dropout"] < 2.0:
        problems.append("dropout has no plausible effect")
    if want_grad:
        d_out = jnp.ones(first.shape, jnp.float32)
        grads = _gradients(impl, inputs, metadata, hardware, d_out, None)
        if not all(bool(jnp.all(jnp.isfinite(g))) for g in grads.values()):
            problems.append("non-finite gradients")
    status = "fail" if problems else "pass"
    return CaseResult(case.name, dtype_name, status, errors, 0.0, want_grad, "; ".join(problems))


def default_dtypes(hardware: Hardware) -> tuple[str, ...]:
    return ("float32",) if hardware.platform == "cpu" else ("bfloat16", "float16")


def run_conformance(
    backend: str | OperationImpl,
    *,
    hardware: Hardware | None = None,
    dtypes: Iterable[Any] | None = None,
    grads: bool = True,
    cases: Sequence[str] | None = None,
    expect_supported: Iterable[str] = (),
    shape: Shape = Shape(),
    metadata: OperationMetadata | None = None,
    op: str | None = None,
    seed: int = 0,
) -> ConformanceReport:
    """Check `backend` (a name, or an instance such as one in interpret mode) case by case.

    `cases` limits the run to the named cases; `expect_supported` names cases whose
    rejection counts as a failure ("*" for all). Returns a `ConformanceReport`;
    call `.assert_ok()` in a test.
    """
    impl = _resolve(backend, op)
    hardware = hardware or _hardware.current()
    dtypes = tuple(dtypes) if dtypes is not None else default_dtypes(hardware)
    selected = [c for c in all_cases(impl.op) if cases is None or c.name in cases]
    if cases is not None:
        unknown = set(cases) - {c.name for c in all_cases(impl.op)}
        if unknown:
            raise ValueError(f"cases: unknown case names {sorted(unknown)}")
    expected = tuple(expect_supported)
    if expected == ("*",):
        expected = tuple(c.name for c in selected)
    results = [
        check_case(impl, case, hardware=hardware, dtype=dtype, grads=grads, shape=shape,
                   metadata=metadata, seed=seed)
        for case in selected
        for dtype in dtypes
    ]
    return ConformanceReport(impl.name, hardware, results, expected)
