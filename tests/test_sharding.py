"""Sharding on 8 fake CPU devices: shard shapes follow the rules table; results equal unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import preset
from jaxlm.errors import UserError
from jaxlm.model import init_model, shard_model
from jaxlm.sharding import DEFAULT_RULES, load_rules, logical_to_pspec, make_mesh, use_mesh


def test_eight_fake_devices():
    assert len(jax.devices()) == 8


def test_rules_table_maps_logical_names():
    rules = load_rules()
    assert logical_to_pspec(("embed", "mlp"), rules) == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert logical_to_pspec(("batch", "length", "act_embed"), rules) == jax.sharding.PartitionSpec(
        ("data", "fsdp"), None, None
    )


def test_mesh_shape_errors():
    with pytest.raises(UserError, match="needs 12 devices but 8 are visible"):
        make_mesh((2, 2, 3))
    assert dict(make_mesh((2, -1, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_parameter_shards_follow_the_rules():
    mesh = make_mesh((2, 2, 2))
    cfg = preset("ts-3m", vocab_size=512)
    model = init_model(cfg, 0, mesh=mesh)
    D, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    blk = model.blocks[0]
    shard = lambda p: p[...].addressable_shards[0].data.shape  # noqa: E731
    assert shard(model.wte_vd) == (V // 2, D // 2)  # vocab->tensor, embed->fsdp
    assert shard(model.wpe_pd) == (cfg.max_positions, D // 2)  # position replicated
    assert shard(blk.mlp.w_up_df) == (D // 2, F // 2)  # embed->fsdp, mlp->tensor
    assert shard(blk.mlp.w_down_fd) == (F // 2, D // 2)
    assert shard(blk.attn.w_q_dnh) == (
        D // 2,
        16 // 2,
        D // 16,
    )  # heads->tensor, head_dim replicated
    assert shard(blk.attn.w_o_nhd) == (16 // 2, D // 16, D // 2)
    assert shard(blk.ln_1.scale_d) == (D,)  # norm replicated
    specs = {
        str(p[...].sharding.spec)
        for p in jax.tree.leaves(
            nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
        )
    }
    assert specs  # every parameter has a NamedSharding on the mesh


@pytest.fixture(scope="module")
def unsharded_forward():
    """Token ids (longer than ts-1m's 256-token local window) and the unsharded model's logits,
    computed once for every mesh shape below."""
    cfg = preset("ts-1m", vocab_size=512)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 512, (8, 300)))
    return cfg, ids, np.asarray(nnx.jit(lambda m, x: m(x))(init_model(cfg, 4), ids))


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1), (8, 1, 1), (1, 2, 4)])
def test_sharded_forward_equals_unsharded(shape, unsharded_forward):
    cfg, ids, ref = unsharded_forward
    mesh = make_mesh(shape)
    model = shard_model(init_model(cfg, 4), mesh)
    with use_mesh(mesh, DEFAULT_RULES):
        x = jax.device_put(ids, jax.sharding.NamedSharding(mesh, logical_to_pspec(("batch", None))))
        out = nnx.jit(lambda m, x: m(x))(model, x)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)
