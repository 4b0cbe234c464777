"""The conformance suite as pytest tests: `pytest --pyargs jaxattn.testing.suite --jaxattn-backend NAME`."""

from __future__ import annotations

from typing import Any

import pytest

from .conformance import run_conformance


def test_conformance(jaxattn_backend: Any, jaxattn_case: str, jaxattn_dtype: str) -> None:
    report = run_conformance(jaxattn_backend, cases=[jaxattn_case], dtypes=[jaxattn_dtype])
    (result,) = report.results
    if result.status == "rejected":
        pytest.skip(f"{report.backend} rejects {jaxattn_case}: {result.detail}")
    report.assert_ok()
