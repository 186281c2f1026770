"""XLA flags that jaxlm's entry points set by default, before the JAX backend starts.

Why: on an H200 the ts-33m bf16 train step ran 2-5% faster with XLA's Triton GEMM emitter off, so
that cuBLAS runs every matmul (26.48 -> 25.24 ms and 26.86 -> 26.27 ms per step, on two machines;
README, Development). The flag only changes how XLA compiles for a GPU. A flag the user already
set in XLA_FLAGS is left as it is. XLA reads XLA_FLAGS once, when the backend starts (the first
device use), so library callers set it themselves or call `apply_defaults()` before that.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULTS = ("--xla_gpu_enable_triton_gemm=false",)


def apply_defaults(env: MutableMapping[str, str] = os.environ) -> str:
    """Append each default whose flag name XLA_FLAGS does not already mention; returns XLA_FLAGS."""
    flags = env.get("XLA_FLAGS", "")
    named = {f.split("=")[0] for f in flags.split()}
    extra = [f for f in DEFAULTS if f.split("=")[0] not in named]
    if extra:
        env["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    return env.get("XLA_FLAGS", "")
