"""The SAE training step, compiled ahead of time for a TPU topology (jaxlm.aot, tpu/aot_check.py).

Why: "do 49,152 latents on ts-33m's MLP at batch 4,096 fit a v5e-8" is answered before a TPU is
rented. The program compiled is the trainer's own: `sae.train._compile` over
`make_layers_step`/`make_train_step`, the optimizer from `make_optimizer`, parameters sharded by
the trainer's rules table (`_rules`, SAE_RULES: latents over fsdp x tensor), buffers and counters
replicated, the optimizer state sharded as the trainer's `_init_state` shards it (Adam's moments
like their parameters, `jaxlm.sharding.opt_state_shardings`), and the [L, N, F] activation batch
sharded as the activation store serves it (rows over `data`). Only the arrays are abstract
(`jax.ShapeDtypeStruct`), since compile-only TPU devices hold no data.

    python tpu/aot_check.py --topology v5e-8 --sae-d-in 3072 --sae-latents 24576 --sae-batch 4096
    report = compile_for_topology("v5p-8", sae_step_builder(sae_config(3072, 49152, 4096)))

The step's plan excludes what lives beside it in a real run: the model (ts-33m: ~0.2 GB) and the
activation store's fill (n_batches_in_buffer x store_batch_size_prompts x context_size rows of F
float32 per layer, rows over `data` only; plus the next fill's forwards while read ahead).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.sharding import logical_to_pspec, opt_state_shardings, param_shardings, use_mesh
from sae.base import SAE, SAE_RULES, Buffer
from sae.registry import create
from sae.train import SAETrainConfig, _compile, _rules, init_stats, make_optimizer

# ts-33m's MLP hidden width (4 x 768) and the paper-scale SAE (SAELens' batch of 4096 rows)
PAPER_D_IN, PAPER_LATENTS, PAPER_BATCH = 3072, 24576, 4096


def sae_config(
    d_in: int,
    d_sae: int,
    batch: int,
    architecture: str = "standard",
    base: SAETrainConfig | None = None,
) -> SAETrainConfig:
    """`base` (default: SAELens' defaults) with the SAE's shape and the step's batch set."""
    base = base or SAETrainConfig()
    sae = dataclasses.replace(base.sae, architecture=architecture, d_in=d_in, d_sae=d_sae)
    data = dataclasses.replace(
        base.data, train_batch_size_tokens=batch, training_tokens=max(batch, 1) * base.steps
    )
    return dataclasses.replace(base, sae=sae, data=data)


class _MeshJit:
    """The jitted step, lowered inside the mesh and the SAE's rules table, as the trainer runs
    it (`use_mesh(mesh, rules)` around the loop): `constrain` resolves the SAE's logical names."""

    def __init__(self, fn, mesh: Mesh, rules):
        self.fn, self.mesh, self.rules = fn, mesh, rules

    def lower(self, *args):
        with use_mesh(self.mesh, self.rules):
            return self.fn.lower(*args)


def _abstract_state(cfg: SAETrainConfig, mesh: Mesh, rules) -> tuple:
    """(graphdef, (params, buffers, opt_state, stats) as sharded ShapeDtypeStructs, the abstract
    SAE): `sae.train._init_state`'s state without computing it."""
    abstract: SAE = nnx.eval_shape(lambda: create(cfg.sae, seed=cfg.seed))
    # flax types a split by several filters as a variadic tuple; two filters give three parts
    graphdef, params, buffers = nnx.split(abstract, nnx.Param, Buffer)  # type: ignore[misc]
    replicated = NamedSharding(mesh, PartitionSpec())

    def sds(x, sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    params = jax.tree.map(
        lambda s, v: v.replace(sds(v, s)),
        param_shardings(params, mesh, rules),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    buffers = jax.tree.map(lambda x: sds(x, replicated), buffers)
    # the optimizer state sharded as the trainer's `_init_state` shards it
    tx, _ = make_optimizer(cfg.optim, cfg.steps)
    p_sh = param_shardings(params, mesh, rules)
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_state = jax.tree.map(
        sds, opt_abstract, opt_state_shardings(opt_abstract, params, p_sh, mesh)
    )
    stats = jax.tree.map(
        lambda x: sds(x, replicated), jax.eval_shape(lambda: init_stats(cfg.sae.n_latents))
    )
    return graphdef, (params, buffers, opt_state, stats), abstract


def build_sae_step(cfg: SAETrainConfig, mesh: Mesh, n_layers: int = 1):
    """(the trainer's jitted step over `n_layers` SAEs, its abstract arguments) on `mesh`: the
    `build(mesh)` contract of `jaxlm.aot.compile_for_topology`. `cfg.sae.d_in` must be set."""
    if not cfg.sae.d_in:
        raise ValueError("sae.d_in must be set for an ahead-of-time compile (--sae-d-in)")
    rules = _rules(cfg)
    graphdef, state, sae = _abstract_state(cfg, mesh, rules)
    tx, _ = make_optimizer(cfg.optim, cfg.steps)
    states = [state] * n_layers  # every layer's SAE has the same shapes and shardings
    step = _compile(graphdef, tx, sae, cfg, states)
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = NamedSharding(mesh, logical_to_pspec((None, "sae_rows", None), SAE_RULES))
    L, N, F = n_layers, cfg.data.train_batch_size_tokens, cfg.sae.d_in
    args = (
        tuple(states),
        jax.ShapeDtypeStruct((L, N, F), jnp.float32, sharding=rows),  # the store's batch
        jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),  # step
        jax.ShapeDtypeStruct((L,), jnp.float32, sharding=replicated),  # activation scales
    )
    return _MeshJit(step, mesh, rules), args


def sae_step_builder(cfg: SAETrainConfig, n_layers: int = 1):
    """`build(mesh)` for `jaxlm.aot.compile_for_topology` / `tpu/aot_check.py`."""
    return lambda mesh: build_sae_step(cfg, mesh, n_layers)


def build(mesh: Mesh):
    """The paper-scale step (`--builder sae.aot:build`): a standard SAE on ts-33m's MLP, 3,072 ->
    24,576 latents, batch 4,096, SAELens' defaults otherwise (configs/sae/default.yaml)."""
    return build_sae_step(sae_config(PAPER_D_IN, PAPER_LATENTS, PAPER_BATCH), mesh)
