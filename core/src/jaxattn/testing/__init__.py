"""The conformance suite, usable by any backend's own tests (ours and third parties').

    from jaxattn.testing import run_conformance
    run_conformance("mybackend", expect_supported=["causal", "gqa"]).assert_ok()

Also available as `jaxattn check BACKEND` and as a pytest plugin:
`pytest --pyargs jaxattn.testing.suite --jaxattn-backend NAME`.
"""

from .cases import Case, Shape, all_cases, attention_cases, paged_cases
from .conformance import (
    FORWARD_TOL,
    GRAD_TOL,
    CaseResult,
    ConformanceReport,
    build_inputs,
    check_case,
    default_dtypes,
    lse_error,
    relative_error,
    run_conformance,
)
from .nonfinite import assert_same_nonfinite, nonfinite_problem

__all__ = [
    "FORWARD_TOL", "GRAD_TOL", "Case", "CaseResult", "ConformanceReport", "Shape", "all_cases",
    "assert_same_nonfinite", "attention_cases", "build_inputs", "check_case", "default_dtypes", "lse_error",
    "nonfinite_problem", "paged_cases", "relative_error", "run_conformance",
]
