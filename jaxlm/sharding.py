"""Meshes, the logical-axis rules table, and the one helper that constrains activations.

Parameters and activations name their axes logically ("embed", "mlp", "batch", ...); the table in
jaxlm/sharding.yaml maps each name to mesh axes of a (data, fsdp, tensor) mesh. The model code
never names a mesh axis, so the same code runs on one CPU, 8 fake CPU devices, a GPU or a TPU pod.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
import yaml
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlm.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
RULES_PATH = Path(__file__).resolve().parent / "sharding.yaml"  # shipped as package data

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def load_rules(path: str | Path | None = None) -> Rules:
    """Read a rules table (YAML mapping logical name -> mesh axis | [axes] | null)."""
    try:
        table = yaml.safe_load(Path(path or RULES_PATH).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path or RULES_PATH}: cannot read the rules table ({e})") from None
    if not isinstance(table, dict):
        raise UserError(f"{path or RULES_PATH}: expected a mapping of logical name to mesh axes")
    rules = []
    for name, axes in table.items():
        if isinstance(axes, list):
            axes = tuple(axes)
        for a in axes if isinstance(axes, tuple) else (axes,):
            if a is not None and a not in MESH_AXES:
                raise UserError(f"{path or RULES_PATH}: rule {name}: unknown mesh axis {a!r}")
        rules.append((name, axes))
    return tuple(rules)


DEFAULT_RULES: Rules = load_rules()


def make_mesh(
    shape: Sequence[int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh. shape=None puts every device on fsdp; -1 fills one axis."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    shape = list(shape) if shape is not None else [1, n, 1]
    if len(shape) != 3:
        raise UserError(f"mesh shape {shape} must have 3 entries (data, fsdp, tensor)")
    if shape.count(-1) > 1:
        raise UserError(f"mesh shape {shape}: at most one -1")
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = n // rest
    if math.prod(shape) != n:
        raise UserError(f"mesh shape {shape} needs {math.prod(shape)} devices but {n} are visible")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_pspec(
    names: Sequence[str | None] | None, rules: Rules = DEFAULT_RULES
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec; a mesh axis is used at most once."""
    if names is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for name in names:
        axes = table.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        tup = axes if isinstance(axes, tuple) else (axes,)
        tup = tuple(a for a in tup if a not in used)
        used.update(tup)
        out.append(tup[0] if len(tup) == 1 else (tup or None))
    return PartitionSpec(*out)


def _fit(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide a dimension (tiny vocabularies, odd head counts)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        tup = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        keep = tuple(a for a in tup if dim % mesh.shape[a] == 0)
        size = math.prod(mesh.shape[a] for a in keep)
        while keep and dim % size:
            keep = keep[:-1]
            size = math.prod(mesh.shape[a] for a in keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return PartitionSpec(*out)


def param_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """NamedShardings for every variable of a (possibly abstract) NNX state, from its axis names."""

    def one(var):
        names = var.get_metadata().get("out_sharding")
        spec = _fit(logical_to_pspec(names, rules), var.get_value().shape, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# --- activation constraints --------------------------------------------------------------------

_ACTIVE = threading.local()


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Activate a mesh and rules table for `constrain` (and set jax's mesh) inside the block."""
    prev = getattr(_ACTIVE, "value", None)
    _ACTIVE.value = (mesh, rules) if mesh is not None else None
    try:
        if mesh is None:
            yield
        else:
            with jax.set_mesh(mesh):
                yield
    finally:
        _ACTIVE.value = prev


def active_mesh() -> Mesh | None:
    cur = getattr(_ACTIVE, "value", None)
    return cur[0] if cur else None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical names; a no-op without an active mesh."""
    cur = getattr(_ACTIVE, "value", None)
    if cur is None:
        return x
    mesh, rules = cur
    spec = _fit(logical_to_pspec(names, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding for a [B, ...] input batch: B over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, logical_to_pspec(("batch",) + (None,) * (ndim - 1), rules))


def opt_state_shardings(opt_abstract, params, p_sh, mesh: Mesh):
    """Shardings of an optimizer state (`opt_abstract`, e.g. `jax.eval_shape(tx.init, params)`):
    moments shard like their parameters (`p_sh`), scalars (counts) are replicated. Left to
    itself, `jax.jit(tx.init)` replicates Adam's zero-initialised moments on every device."""
    by_shape_path: dict[str, tuple] = {}
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_s = jax.tree.leaves(p_sh)
    for (path, leaf), sh in zip(flat_p, flat_s, strict=True):
        by_shape_path[jax.tree_util.keystr(path)] = (leaf.shape, sh)
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        for pkey, (shape, sh) in by_shape_path.items():
            if key.endswith(pkey) and shape == leaf.shape:
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_abstract)


def describe(mesh: Mesh) -> str:
    return (
        " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
        + f" ({np.prod(list(mesh.shape.values()))} devices)"
    )
