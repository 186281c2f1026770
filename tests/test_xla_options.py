"""jaxlm.xla_options: the train step's XLA options by backend; a flag named in XLA_FLAGS wins."""

import jax
import jax.numpy as jnp
import pytest

from jaxlm.xla_options import DEFAULTS, compiler_options


def test_gpu_defaults_only_on_gpu_and_the_users_flag_wins(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert compiler_options("gpu") == DEFAULTS["gpu"] == {"xla_gpu_enable_triton_gemm": False}
    assert compiler_options("cpu") is None and compiler_options("tpu") is None
    assert compiler_options("cpu", {"xla_cpu_use_xnnpack": True}) == {"xla_cpu_use_xnnpack": True}
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x --xla_gpu_enable_triton_gemm=true")
    assert compiler_options("gpu") is None
    assert compiler_options("gpu", {"xla_gpu_autotune_level": 0}) == {"xla_gpu_autotune_level": 0}


def test_the_options_reach_xla():
    """jax.jit hands them to XLA: a misspelt one fails the compile, so none is silently dropped."""
    f = jax.jit(lambda x: x * 2, compiler_options=compiler_options("gpu"))
    assert float(f(jnp.float32(2))) == 4.0  # a GPU option compiles on any backend
    g = jax.jit(lambda x: x * 2, compiler_options=compiler_options("cpu", {"xla_no_such": 1}))
    with pytest.raises(Exception, match="xla_no_such"):
        g(jnp.float32(2))
