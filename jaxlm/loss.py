"""The training loss: next-token cross-entropy fused with the tied output projection.

Why fused: at vocabulary 32000 the logits are the largest tensor of a step ([B, T, V] in float32 is
4.2 GB at 64 x 512), and plain autodiff writes them, reads them for the log-sum-exp, scatters the
one-hot gradient into a second [B, T, V] buffer and transposes it for the weight gradient. Here the
sequence is cut into chunks; for each chunk the forward pass computes the logits, the loss, and at
once the gradient `softmax - onehot` and its two products (d hidden, d embedding), so no [B, T, V]
tensor ever exists (the Liger-kernel / "cut cross-entropy" idea). The backward pass only scales
the stored gradients by the incoming cotangent. Same mathematics as the plain loss; sums run in a
different order, so results agree to float rounding (tests/test_loss.py).

Passes over a chunk's logits, the largest tensor: one for the row maximum, one that writes
p = exp(logits - max) and sums it on the way. The gradient matmuls take p itself and the softmax's
1/sum scales their small [B, C, D] sides; the one-hot term, once per step, is a gather of the
targets' embedding rows (d hidden) and a scatter-add of the hidden rows into them (d embedding).
Normalising p and subtracting the one-hot first would cost one more read and write of the logits.

Mixed precision follows torch autocast, which is what the PyTorch peers compute: in bfloat16 the
hidden states and weights enter the matmuls in bf16, the logits come out in bf16 (autocast's linear
returns bf16; the peers then upcast), log-softmax runs in float32, and p (the logit gradient but
for its scale and one-hot term) is cast to bf16 for the two backward matmuls (accumulated in
float32).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

Array = jax.Array


def _chunk_len(B: int, T: int, rows: int) -> int:
    """The largest divisor of T with B x chunk <= rows (at least 1): chunks cut T, not B, so a
    batch sharded over devices stays sharded."""
    best = 1
    for c in range(1, T + 1):
        if T % c == 0 and B * c <= max(rows, B):
            best = c
    return best


def _chunks(x_btd: Array, targets_bt: Array, c: int) -> tuple[Array, Array]:
    B, T, D = x_btd.shape
    x_kbcd = x_btd.reshape(B, T // c, c, D).swapaxes(0, 1)  # [K, B, C, D]
    t_kbc = targets_bt.reshape(B, T // c, c).swapaxes(0, 1)  # [K, B, C]
    return x_kbcd, t_kbc


def _logits(x_bcd: Array, w_vd: Array, dtype) -> Array:
    """float32 logits [B, C, V]; in a 16-bit dtype the matmul's output is rounded to it first (it
    accumulates in float32), as autocast's bf16 linear gives them: half the bytes to write."""
    out = jnp.float32 if jnp.dtype(dtype).itemsize >= 4 else dtype
    logits = jnp.einsum(
        "bcd,vd->bcv", x_bcd.astype(dtype), w_vd.astype(dtype), preferred_element_type=out
    )
    return logits.astype(jnp.float32)


def _nll_sum(logits_bcv: Array, t_bc: Array) -> tuple[Array, Array]:
    logz_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
    gold_bc = jnp.take_along_axis(logits_bcv, t_bc[..., None], axis=-1)[..., 0]
    return jnp.sum(logz_bc - gold_bc), logz_bc


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def linear_cross_entropy(
    x_btd: Array, w_vd: Array, targets_bt: Array, dtype: str = "float32", rows: int = 2048
) -> Array:
    """Mean over B x T of -log softmax(x @ w.T)[target], never holding all [B, T, V] logits.

    x_btd: final hidden states [B, T, D]; w_vd: the (tied) output embedding [V, D], float32 master
    weights; dtype: the matmul input dtype; rows: about how many (b, t) rows one chunk holds.
    """
    B, T = targets_bt.shape
    c = _chunk_len(B, T, rows)
    x_kbcd, t_kbc = _chunks(x_btd, targets_bt, c)

    def body(total, inp):
        x_bcd, t_bc = inp
        return total + _nll_sum(_logits(x_bcd, w_vd, dtype), t_bc)[0], None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (x_kbcd, t_kbc))
    return total / targets_bt.size


def _lce_fwd(x_btd, w_vd, targets_bt, dtype, rows):
    B, T, D = x_btd.shape
    c = _chunk_len(B, T, rows)
    x_kbcd, t_kbc = _chunks(x_btd, targets_bt, c)
    scale = 1.0 / targets_bt.size
    w_c = w_vd.astype(dtype)

    def body(dw_vd, inp):
        x_bcd, t_bc = inp
        x_bcd = x_bcd.astype(dtype)
        logits_bcv = _logits(x_bcd, w_c, dtype)
        max_bc = jnp.max(logits_bcv, axis=-1)
        p_bcv = jnp.exp(logits_bcv - max_bc[..., None])  # unnormalised softmax, in (0, 1]
        sum_bc = jnp.sum(p_bcv, axis=-1)
        gold_bc = jnp.take_along_axis(logits_bcv, t_bc[..., None], axis=-1)[..., 0]
        nll = jnp.sum(max_bc + jnp.log(sum_bc) - gold_bc)
        # d loss / d logits = (p / sum - onehot) * scale; the products take p and scale the rest
        p_bcv = p_bcv.astype(dtype)
        r_bc1 = (scale / sum_bc)[..., None]
        dx_bcd = jnp.einsum("bcv,vd->bcd", p_bcv, w_c, preferred_element_type=jnp.float32)
        xr_bcd = (x_bcd.astype(jnp.float32) * r_bc1).astype(dtype)
        dw_vd = dw_vd + jnp.einsum("bcv,bcd->vd", p_bcv, xr_bcd, preferred_element_type=jnp.float32)
        return dw_vd, (nll, dx_bcd * r_bc1)

    dw0_vd = jnp.zeros(w_vd.shape, jnp.float32)
    dw_vd, (nll_k, dx_kbcd) = jax.lax.scan(body, dw0_vd, (x_kbcd, t_kbc))
    # the one-hot term, once for all chunks (sharded, a scatter in the loop cost an all-reduce each)
    x32_btd = x_btd.astype(dtype).astype(jnp.float32)
    dw_vd = dw_vd.at[targets_bt.reshape(-1)].add(-scale * x32_btd.reshape(-1, D))
    dx_btd = dx_kbcd.swapaxes(0, 1).reshape(B, T, D) - scale * w_c[targets_bt].astype(jnp.float32)
    return jnp.sum(nll_k) * scale, (dx_btd.astype(x_btd.dtype), dw_vd.astype(w_vd.dtype))


def _lce_bwd(dtype, rows, res, g):
    dx_btd, dw_vd = res
    return (dx_btd * g).astype(dx_btd.dtype), (dw_vd * g).astype(dw_vd.dtype), None


linear_cross_entropy.defvjp(_lce_fwd, _lce_bwd)
