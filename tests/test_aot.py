"""Ahead-of-time compiles for named TPU topologies (jaxlm/aot.py, tpu/aot_check.py).

Needs libtpu (the `tpu` extra), not a TPU: skipped with a reason where it is not installed.
The stand-in step below is a sharded MLP with an AdamW update, so the machinery is tested
without jaxlm's train step; `build_mlp_step` is also what `--builder` loads in the CLI test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm import aot
from jaxlm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(), reason='libtpu not installed (pip install "jax[tpu]")'
)

D, F, B = 512, 2048, 64  # model, mlp, batch of the stand-in step


def _loss(params: dict, x_bd: jax.Array) -> jax.Array:
    h_bf = jax.nn.gelu(x_bd @ params["w_up_df"])
    return jnp.mean((h_bf @ params["w_down_fd"] - x_bd) ** 2)


def build_mlp_step(mesh: Mesh):
    """Stand-in train step: params and AdamW moments sharded on fsdp, batch on (data, fsdp)."""
    opt = optax.adamw(1e-3)

    def spec(shape, pspec):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, pspec))

    params = {"w_up_df": spec((D, F), P("fsdp", None)), "w_down_fd": spec((F, D), P(None, "fsdp"))}

    def like_param(path, s):  # AdamW's mu and nu mirror the params; its count is replicated
        name = getattr(path[-1], "key", None)
        pspec = params[name].sharding.spec if name in params else P()
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, pspec))

    opt_state = jax.tree_util.tree_map_with_path(like_param, jax.eval_shape(opt.init, params))
    x_bd = spec((B, D), P(("data", "fsdp"), None))

    @jax.jit
    def step(params, opt_state, x_bd):
        loss, grads = jax.value_and_grad(_loss)(params, x_bd)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    return step, (params, opt_state, x_bd)


def test_topology_table_matches_hbm_and_names():
    assert {t.generation for t in aot.TOPOLOGIES.values()} == set(aot.HBM_GIB)
    assert aot.get_topology("v5e-8").hbm_bytes == 16 * aot.GIB
    with pytest.raises(UserError, match="unknown TPU topology 'v9-8'"):
        aot.get_topology("v9-8")


def test_mesh_for_devices_puts_the_rest_on_fsdp():
    mesh = aot.mesh_for_devices(jax.devices()[:8], data=2)
    assert mesh.axis_names == aot.MESH_AXES and dict(mesh.shape) == {
        "data": 2,
        "fsdp": 4,
        "tensor": 1,
    }
    with pytest.raises(UserError, match="must divide"):
        aot.mesh_for_devices(jax.devices()[:8], data=3)


@needs_libtpu
@pytest.mark.parametrize(
    "name,devices,hosts",
    [("v4-8", 4, 1), ("v4-32", 16, 4), ("v5e-8", 8, 1), ("v5e-16", 16, 4), ("v5e-256", 256, 64),
     ("v5p-8", 4, 1), ("v5p-128", 64, 16), ("v6e-8", 8, 1)],
)  # fmt: skip
def test_every_topology_has_its_devices_and_hosts(name, devices, hosts):
    devs = aot.topology_devices(name)
    assert len(devs) == devices
    assert len({d.process_index for d in devs}) == hosts
    assert all(d.platform == "tpu" for d in devs)


@needs_libtpu
def test_stand_in_step_compiles_for_v5e_8():
    report = aot.compile_for_topology("v5e-8", build_mlp_step, data=2)
    assert report.device_kind == "TPU v5 lite" and report.devices == 8 and report.hosts == 1
    assert report.mesh == {"data": 2, "fsdp": 4, "tensor": 1}
    # Params (2 x D x F fp32) and both AdamW moments are sharded 4 ways on fsdp.
    sharded_state = 3 * 2 * D * F * 4 // 4
    assert sharded_state <= report.argument_bytes < sharded_state + B * D * 4
    assert report.alias_bytes > 0  # params and optimizer state are donated
    parts = (report.argument_bytes, report.output_bytes, report.temp_bytes)
    assert report.hbm_used_bytes == sum(parts) + report.generated_code_bytes - report.alias_bytes
    assert report.fits and report.hbm_capacity_bytes == 16 * aot.GIB
    # Forward + backward of two matmuls on this chip's B/8 rows: ~6 * (B/8) * D * F * 2 flops.
    assert report.flops >= 6 * (B // 8) * D * F * 2 * 0.9
    assert json.loads(report.to_json())["topology"] == "v5e-8"


@needs_libtpu
def test_xla_refusing_to_compile_for_lack_of_hbm_is_a_report_not_a_crash():
    def build(mesh):
        x = jax.ShapeDtypeStruct((46000,), jnp.float32, sharding=NamedSharding(mesh, P()))

        @jax.jit
        def argsort_outer(x):  # keys + indices of 2.1e9 elements: > 16 GiB of temporaries
            return jnp.argsort(jnp.outer(x, x).reshape(-1))[:4]

        return argsort_outer, (x,)

    report = aot.compile_for_topology("v5e-8", build)
    assert not report.fits and "RESOURCE_EXHAUSTED" in report.error
    assert json.loads(report.to_json())["hbm_used_gib"] is None


@needs_libtpu
def test_aot_check_cli_prints_json_and_fails_when_it_does_not_fit(capsys, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from tpu import aot_check

    builder = f"{Path(__file__).resolve()}:build_mlp_step"
    assert aot_check.main(["--topology", "v5e-8", "--builder", builder]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["mesh"]["fsdp"] == 8
    monkeypatch.setitem(aot.HBM_GIB, "v5e", 1 / 1024)  # a 1 MiB chip: the step cannot fit
    assert aot_check.main(["--topology", "v5e-8", "--builder", builder]) == 1
    assert json.loads(capsys.readouterr().out)["fits"] is False


def test_aot_check_cli_usage_errors_are_one_line(capsys):
    sys.path.insert(0, str(ROOT))
    from tpu import aot_check

    assert aot_check.main(["--topology", "v5e-8", "--builder", "no_colon"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aot_check: error:") and err.count("\n") == 1
