"""What-if hardware is context-local; `jax.export` with symbolic batch and sequence runs the
`xla` backend; forward-mode AD is refused clearly; a backend that declares a platform it
has no forward for never reaches `auto`."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxattn
from jaxattn import Hardware, hardware

Q = jax.random.normal(jax.random.PRNGKey(0), (3, 10, 4, 16))
K = jax.random.normal(jax.random.PRNGKey(1), (3, 10, 2, 16))


def test_hardware_override_stays_in_its_thread():
    inside, outside = threading.Event(), threading.Event()
    seen = {}

    def what_if():
        with hardware.override(Hardware.tpu()):
            seen["what_if"] = hardware.current().platform
            inside.set()
            outside.wait(30)

    def real_call():
        inside.wait(30)
        seen["real"] = hardware.current().platform
        seen["backend"] = jaxattn.select(Q, K, K).name
        outside.set()

    threads = [threading.Thread(target=what_if), threading.Thread(target=real_call)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert seen == {"what_if": "tpu", "real": hardware.detect().platform, "backend": jaxattn.select(Q, K, K).name}


@pytest.mark.parametrize("causal", [False, True])
def test_export_with_symbolic_batch_and_sequence(causal):
    def f(q, k, v):
        return jaxattn.attention(q, k, v, is_causal=causal, backend="xla")

    q_spec = jax.ShapeDtypeStruct(export.symbolic_shape("b, s, 4, 16"), jnp.float32)
    kv_spec = jax.ShapeDtypeStruct(export.symbolic_shape("b, s, 2, 16", scope=q_spec.shape[0].scope), jnp.float32)
    exported = export.export(jax.jit(f))(q_spec, kv_spec, kv_spec)
    for b, s in ((3, 10), (1, 600)):  # 600: more than one 512-block
        q = jax.random.normal(jax.random.PRNGKey(b), (b, s, 4, 16))
        k = jax.random.normal(jax.random.PRNGKey(s), (b, s, 2, 16))
        np.testing.assert_allclose(exported.call(q, k, k), f(q, k, k), rtol=1e-5, atol=1e-6)


def test_forward_mode_autodiff_is_refused():
    """custom_vjp backends have no JVP rule: the error says so (README: Transformations)."""
    with pytest.raises(TypeError, match="forward-mode autodiff .* is not supported"):
        jax.jvp(lambda q: jaxattn.attention(q, K, K), (Q,), (jnp.ones_like(Q),))


def test_a_backend_without_the_forward_it_declares_never_reaches_auto():
    class NoForward(jaxattn.OperationImpl):
        name, op, platforms, priority = "noforward", "attention", ("cpu",), {"cpu": 1000}

        def supports(self, request, hw):
            return jaxattn.Support.yes()

    reg = jaxattn.default_registry()
    reg.add_plugin(type("P", (), {"jaxattn_register_backends": jaxattn.hookimpl(lambda self: [NoForward()])})(),
                   "noforward")
    try:
        selection = jaxattn.select(Q, K, K, hardware=Hardware.cpu())
        assert selection.name == "xla"
        assert "no forward for platform cpu" in selection.explain()
        assert np.all(np.isfinite(jaxattn.attention(Q, K, K)))
    finally:
        reg.remove_plugin("noforward")
