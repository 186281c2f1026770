"""Ahead-of-time compile checks for named TPU topologies, on any machine that has libtpu.

libtpu's compiler runs on any x86-64 Linux host: `jax.experimental.topologies.get_topology_desc`
gives compile-only TPU devices, a `Mesh` over them shards abstract arguments, and
`jit(...).lower(...).compile()` runs XLA's TPU pipeline without a chip. What comes back is
the real per-chip memory plan (`memory_analysis()`) and XLA's cost model (`cost_analysis()`),
so "does ts-33m at batch 512 fit a v5e-8" is answered before a TPU is rented.

Any jitted step plugs in through a `build(mesh) -> (jitted_fn, abstract_args)` callable:

    report = compile_for_topology("v5e-8", lambda mesh: my_step_and_args(mesh))
    print(report.to_json())

Works with JAX_PLATFORMS=cpu: the compile-only devices need no TPU backend.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxlm.errors import UserError

GIB = 1024**3
MESH_AXES = ("data", "fsdp", "tensor")

# HBM per chip, GiB, by generation (Cloud TPU system architecture pages). v5p is 95 GiB usable.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


@dataclasses.dataclass(frozen=True)
class TpuTopology:
    """One named slice: how libtpu spells it and what each chip holds."""

    name: str  # the accelerator name people use: "v5e-8"
    generation: str  # key into HBM_GIB: "v5e"
    topology_name: str  # libtpu's "<chip>:<AxBxC>" spelling
    chip_config: str  # "megacore" (v4, v5p: two TensorCores act as one device) or "default"
    chips_per_host: tuple[int, int, int]  # chips on one TPU VM worker, per dimension
    wrap: tuple[bool, bool, bool]  # torus wrap-around links per dimension

    @property
    def hbm_bytes(self) -> int:
        """HBM of one chip of this generation, in bytes."""
        return int(HBM_GIB[self.generation] * GIB)


_NO_WRAP = (False, False, False)
# v4-N and v5p-N count TensorCores (2 per chip); v5e-N and v6e-N count chips.
TOPOLOGIES: dict[str, TpuTopology] = {
    t.name: t
    for t in (
        TpuTopology("v4-8", "v4", "v4:2x2x1", "megacore", (2, 2, 1), _NO_WRAP),
        TpuTopology("v4-32", "v4", "v4:2x2x4", "megacore", (2, 2, 1), _NO_WRAP),
        TpuTopology("v5e-8", "v5e", "v5e:2x4", "default", (2, 4, 1), _NO_WRAP),
        TpuTopology("v5e-16", "v5e", "v5e:4x4", "default", (2, 2, 1), _NO_WRAP),
        TpuTopology("v5e-256", "v5e", "v5e:16x16", "default", (2, 2, 1), (True, True, False)),
        TpuTopology("v5p-8", "v5p", "v5p:2x2x1", "megacore", (2, 2, 1), _NO_WRAP),
        TpuTopology("v5p-128", "v5p", "v5p:4x4x4", "megacore", (2, 2, 1), (True, True, True)),
        TpuTopology("v6e-8", "v6e", "v6e:2x4", "default", (2, 4, 1), _NO_WRAP),
    )
}


def get_topology(name: str) -> TpuTopology:
    """The table entry for `name`, or a one-line UserError listing the known names."""
    if name not in TOPOLOGIES:
        raise UserError(f"unknown TPU topology {name!r}; choose one of {', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[name]


def libtpu_available() -> bool:
    """Whether libtpu is installed, so TPU topologies can be compiled for here."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def topology_devices(name: str) -> list[jax.Device]:
    """Compile-only TPU devices for a named topology (needs libtpu, not a TPU)."""
    from jax.experimental import topologies

    topo = get_topology(name)
    if not libtpu_available():
        raise UserError('libtpu is not installed: pip install "jax[tpu]==<your jax version>"')
    _quiet_compile_only_libtpu()
    desc = topologies.get_topology_desc(
        topology_name=topo.topology_name,
        platform="tpu",
        chip_config_name=topo.chip_config,
        chips_per_host_bounds=topo.chips_per_host,
        num_slices=1,
        wrap=topo.wrap,
    )
    return list(desc.devices)


def _quiet_compile_only_libtpu() -> None:
    """Let libtpu load for compiling only: no lockfile, no TPU metadata-server queries.

    Only when this process runs on CPU (JAX_PLATFORMS=cpu), so the real TPU runtime is never
    misconfigured. Without these, a second process (pytest -n 2) fails on
    /tmp/libtpu_lockfile and libtpu prints a page of "could not determine TPU" warnings.
    """
    if os.environ.get("JAX_PLATFORMS") != "cpu":
        return
    for key, value in {
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
        "TPU_SKIP_MDS_QUERY": "1",
        "TPU_ACCELERATOR_TYPE": "v5litepod-8",  # any valid name: the topology comes from us
        "TPU_WORKER_ID": "0",
        "TPU_WORKER_HOSTNAMES": "localhost",
    }.items():
        os.environ.setdefault(key, value)


def mesh_for_devices(devices: Sequence[jax.Device], data: int = 1, tensor: int = 1) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh: `data` x `tensor` as given, fsdp takes the rest."""
    n = len(devices)
    if data < 1 or tensor < 1 or n % (data * tensor):
        raise UserError(f"data={data} x tensor={tensor} must divide the {n} devices of the slice")
    shape = (data, n // (data * tensor), tensor)
    if devices[0].platform == "tpu":
        from jax.experimental import mesh_utils

        # Physical-topology-aware order: neighbours on the torus are neighbours in the mesh.
        grid = mesh_utils.create_device_mesh(shape, list(devices))
    else:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def topology_mesh(name: str, data: int = 1, tensor: int = 1) -> Mesh:
    """The ("data", "fsdp", "tensor") mesh over a named topology's compile-only devices."""
    return mesh_for_devices(topology_devices(name), data=data, tensor=tensor)


@dataclasses.dataclass(frozen=True)
class AotReport:
    """What XLA planned for one chip of the slice; `fits` says whether it fits in HBM."""

    topology: str
    device_kind: str
    devices: int
    hosts: int
    mesh: dict[str, int]
    compile_s: float
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    alias_bytes: int
    hbm_used_bytes: int  # argument + output + temp + generated code - alias, per chip
    hbm_capacity_bytes: int
    fits: bool
    flops: float  # XLA's cost model, per chip (the partitioned program)
    bytes_accessed: float
    error: str | None = None  # XLA's RESOURCE_EXHAUSTED message when it refused to compile

    @property
    def hbm_used_fraction(self) -> float:
        """Planned per-chip bytes over the chip's HBM."""
        return self.hbm_used_bytes / self.hbm_capacity_bytes

    def to_dict(self) -> dict[str, Any]:
        """The fields plus GiB and fraction conveniences."""
        d = dataclasses.asdict(self)
        known = self.hbm_used_bytes >= 0  # -1 when XLA refused to compile
        d["hbm_used_gib"] = round(self.hbm_used_bytes / GIB, 4) if known else None
        d["hbm_capacity_gib"] = round(self.hbm_capacity_bytes / GIB, 2)
        d["hbm_used_fraction"] = round(self.hbm_used_fraction, 4) if known else None
        return d

    def to_json(self) -> str:
        """One JSON object, keys sorted."""
        return json.dumps(self.to_dict(), sort_keys=True)


class Lowerable(Protocol):
    """The step a builder returns: `jax.jit`'s result, or a wrapper that lowers it in a context."""

    def lower(self, *args: Any) -> Any: ...


BuildFn = Callable[[Mesh], tuple[Lowerable, tuple[Any, ...]]]


def compile_for_topology(
    topology: str, build: BuildFn, *, data: int = 1, tensor: int = 1
) -> AotReport:
    """Compile `build(mesh)`'s jitted step for a named TPU topology and report per-chip memory.

    `build` gets the ("data", "fsdp", "tensor") mesh over the topology's devices and returns
    `(jitted_fn, abstract_args)`, where abstract args are pytrees of `jax.ShapeDtypeStruct`
    carrying `NamedSharding`s on that mesh. Lowering runs under `jax.set_mesh(mesh)`, so steps
    that constrain activations by mesh axis name resolve them against this mesh; a step that
    needs more context (logical-axis rules) enters it in its own `lower`.
    """
    topo = get_topology(topology)
    mesh = topology_mesh(topology, data=data, tensor=tensor)
    fn, args = build(mesh)  # no mesh context here: builders bring their own (nnx + rules)
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        try:
            compiled = fn.lower(*args).compile()
        except jax.errors.JaxRuntimeError as e:
            # XLA refuses a program whose static allocation exceeds HBM: that is "does not fit".
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            return _report(topo, mesh, None, time.perf_counter() - start, error=str(e))
        compile_s = time.perf_counter() - start
    return _report(topo, mesh, compiled, compile_s)


def _report(
    topo: TpuTopology, mesh: Mesh, compiled: Any, compile_s: float, error: str | None = None
) -> AotReport:
    """The report for a compiled step, or for one XLA refused to compile (`error`; sizes -1)."""
    parts = dict.fromkeys(_MEMORY_PARTS, -1)
    cost: Any = {}
    if compiled is not None:
        mem = compiled.memory_analysis()
        parts = {k: int(getattr(mem, attr)) for k, attr in _MEMORY_PARTS.items()}
        cost = compiled.cost_analysis()
        if isinstance(cost, list | tuple):  # older jax returned one dict per program
            cost = cost[0] if cost else {}
    used = sum(parts.values()) - 2 * parts["alias_bytes"] if compiled is not None else -1
    devices = list(mesh.devices.flat)
    return AotReport(
        topology=topo.name,
        device_kind=devices[0].device_kind,
        devices=len(devices),
        hosts=len({d.process_index for d in devices}),
        mesh=dict(mesh.shape),
        compile_s=round(compile_s, 3),
        **parts,
        hbm_used_bytes=used,
        hbm_capacity_bytes=topo.hbm_bytes,
        fits=error is None and used <= topo.hbm_bytes,
        flops=float((cost or {}).get("flops", -1.0)),  # -1: XLA gave no estimate
        bytes_accessed=float((cost or {}).get("bytes accessed", -1.0)),
        error=error.splitlines()[0][:500] if error else None,
    )


_MEMORY_PARTS = {
    "argument_bytes": "argument_size_in_bytes",
    "output_bytes": "output_size_in_bytes",
    "temp_bytes": "temp_size_in_bytes",
    "generated_code_bytes": "generated_code_size_in_bytes",
    "alias_bytes": "alias_size_in_bytes",
}
