"""The fused output-projection + cross-entropy (jaxlm.loss) equals the plain loss and its gradients,
for any chunking, in float32, sharded or not; in bfloat16 it stays close to the float32 truth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import preset
from jaxlm.loss import _chunk_len, linear_cross_entropy
from jaxlm.model import init_model, shard_model
from jaxlm.sharding import DEFAULT_RULES, logical_to_pspec, make_mesh, use_mesh
from jaxlm.train.lm import next_token_loss


def _plain(x_btd, w_vd, t_bt):
    logits = jnp.einsum("btd,vd->btv", x_btd, w_vd)
    gold = jnp.take_along_axis(logits, t_bt[..., None], axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - gold)


def _data(B=4, T=24, D=16, V=300, seed=0):
    r = np.random.RandomState(seed)
    x = jnp.asarray(r.randn(B, T, D).astype(np.float32))
    w = jnp.asarray(r.randn(V, D).astype(np.float32))  # large logits: logsumexp must be stable
    t = jnp.asarray(r.randint(0, V, (B, T)).astype(np.int32))
    return x, w, t


@pytest.mark.parametrize("rows", [1, 8, 24, 40, 96, 10_000])
def test_fused_loss_and_gradients_equal_plain(rows):
    x, w, t = _data()
    ref_loss, (ref_dx, ref_dw) = jax.value_and_grad(_plain, (0, 1))(x, w, t)
    f = lambda x, w: linear_cross_entropy(x, w, t, "float32", rows)  # noqa: E731
    loss, (dx, dw) = jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    np.testing.assert_allclose(dx, ref_dx, atol=1e-5 * float(jnp.abs(ref_dx).max()), rtol=0)
    np.testing.assert_allclose(dw, ref_dw, atol=1e-5 * float(jnp.abs(ref_dw).max()), rtol=0)
    assert abs(float(jax.jit(f)(x, w)) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))


def test_cotangent_scales_the_gradient():
    x, w, t = _data()
    g = jax.grad(lambda x: 3.0 * linear_cross_entropy(x, w, t, "float32", 16))(x)
    ref = jax.grad(lambda x: 3.0 * _plain(x, w, t))(x)
    np.testing.assert_allclose(g, ref, atol=1e-5 * float(jnp.abs(ref).max()), rtol=0)


def test_chunks_cut_time_not_batch():
    assert _chunk_len(8, 512, 1024) == 128
    assert _chunk_len(8, 512, 5) == 1  # fewer rows than the batch: one position per chunk
    assert _chunk_len(3, 7, 100) == 7  # a prime length: one chunk
    assert _chunk_len(64, 512, 8192) == 128


def test_model_loss_fused_equals_plain_with_gradients():
    cfg = preset("ts-1m", vocab_size=512)
    graphdef, params = nnx.split(init_model(cfg, 3), nnx.Param)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 512, (4, 65)))
    out = {}
    for impl in ("plain", "fused"):
        f = lambda p, impl=impl: next_token_loss(nnx.merge(graphdef, p), tokens, impl, 64)  # noqa: E731
        out[impl] = jax.jit(jax.value_and_grad(f))(params)
    assert abs(float(out["fused"][0]) - float(out["plain"][0])) <= 1e-5
    flat_p, flat_f = (jax.tree.leaves(out[k][1]) for k in ("plain", "fused"))
    for a, b in zip(flat_p, flat_f, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5 * max(1e-3, float(jnp.abs(a).max())), rtol=0)


def test_bfloat16_fused_loss_is_close_to_float32():
    """bf16 inputs and logits, float32 softmax (torch autocast's recipe): about 1e-2 relative."""
    x, w, t = _data(D=64)
    w = w / 8
    ref_loss, ref_dx = jax.value_and_grad(_plain)(x, w, t)
    loss, dx = jax.value_and_grad(lambda x: linear_cross_entropy(x, w, t, "bfloat16", 32))(x)
    assert dx.dtype == jnp.float32
    assert abs(float(loss) - float(ref_loss)) <= 2e-2 * abs(float(ref_loss))
    assert float(jnp.abs(dx - ref_dx).max()) <= 3e-2 * float(jnp.abs(ref_dx).max())


def test_fused_loss_sharded_equals_one_device():
    cfg = preset("ts-1m", vocab_size=512)
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 512, (8, 129)))
    graphdef, params = nnx.split(init_model(cfg, 5), nnx.Param)
    f = lambda p, t: next_token_loss(nnx.merge(graphdef, p), t, "fused", 256)  # noqa: E731
    ref_loss, ref_g = jax.jit(jax.value_and_grad(f))(params, tokens)
    mesh = make_mesh((2, 2, 2))
    model = shard_model(init_model(cfg, 5), mesh)
    _, sparams = nnx.split(model, nnx.Param)
    with use_mesh(mesh, DEFAULT_RULES):
        spec = logical_to_pspec(("batch", None))
        t = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, spec))
        loss, g = jax.jit(jax.value_and_grad(f))(sparams, t)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5
    for a, b in zip(jax.tree.leaves(ref_g), jax.tree.leaves(g), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5 * max(1e-3, float(jnp.abs(a).max())), rtol=0)
