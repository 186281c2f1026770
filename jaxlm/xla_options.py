"""XLA compiler options for jaxlm's jitted train and eval steps, by backend.

Why: on an H200 the ts-33m bf16 train step ran 2-5% faster with XLA's Triton GEMM emitter off, so
that cuBLAS runs every matmul (26.48 -> 25.24, 26.86 -> 26.27 and 26.11 -> 25.43 ms per step, on
three machines; README, Development). They are passed to `jax.jit(compiler_options=...)` of those
steps only, so library callers get them too and nothing else in the process changes. A flag the
user names in XLA_FLAGS is left to that setting.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax

DEFAULTS: dict[str, dict[str, Any]] = {"gpu": {"xla_gpu_enable_triton_gemm": False}}


def compiler_options(
    backend: str | None = None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The defaults for `backend` (jax's default backend if None) less any flag XLA_FLAGS names,
    then `extra` on top; None when empty (jax.jit's own default)."""
    opts = dict(DEFAULTS.get(backend or jax.default_backend(), {}))
    named = {f.split("=")[0].lstrip("-") for f in os.environ.get("XLA_FLAGS", "").split()}
    opts = {k: v for k, v in opts.items() if k not in named}
    opts.update(extra or {})
    return opts or None
