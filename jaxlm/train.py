"""Pretraining and continual pre-training: one jitted, sharded train step and a resumable loop.

`train(cfg, workdir)` reads top to bottom in phases: distributed set-up and mesh, data, model and
optimizer (fresh, restored from the workdir, or initialised from another model), then the loop.
Rerunning the same command resumes from the newest readable checkpoint, with the data iterator
restored too, so an interrupted run ends bitwise equal to an uninterrupted one on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time
import zlib
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxlm import overlay
from jaxlm.checkpoint import checkpoint_manager, load_model, read_meta, write_meta
from jaxlm.config import COMPUTE_FIELDS, ModelConfig, preset
from jaxlm.errors import UserError
from jaxlm.loss import linear_cross_entropy
from jaxlm.model import GPTNeo, init_model
from jaxlm.sharding import DEFAULT_RULES, batch_sharding, load_rules, make_mesh, use_mesh
from jaxlm.tokenizer import check_data_tokenizer
from jaxlm.xla_options import compiler_options

log = logging.getLogger("jaxlm.train")


# --- configuration -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSection:
    preset: str = "ts-1m"  # one of jaxlm.config.PRESETS
    vocab_size: int | None = None  # None: the tokenizer's, from the data's metadata.json
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; weights stay float32
    attention_impl: Literal["xla", "cudnn", "auto"] = "auto"  # auto: cuDNN flash on GPUs in bf16
    remat: bool = False  # recompute blocks in the backward pass to save memory
    residual_float32: bool = False  # bf16: residual stream in float32, as torch autocast
    loss_impl: Literal["fused", "plain"] = "fused"  # fused: output projection + CE in chunks
    loss_chunk_rows: int = 0  # (b, t) rows per fused-loss chunk; 0: default_loss_chunk_rows()


@dataclasses.dataclass(frozen=True)
class DataSource:
    path: str  # a DATADIR written by `jaxlm data prepare`
    weight: float = 1.0  # relative mixing weight


@dataclasses.dataclass(frozen=True)
class DataSection:
    sources: tuple[DataSource, ...] = ()  # training data; --data DIR[:WEIGHT] replaces these
    worker_count: int = 0  # Grain worker processes (0: threads in this process)


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """AdamW with the TinyStories models' settings (their model cards)."""

    lr: float = 5e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices and embeddings, not to biases or LayerNorm
    clip_norm: float = 1.0  # global gradient-norm clipping; 0 turns it off
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio


@dataclasses.dataclass(frozen=True)
class EvalSection:
    every: int = 0  # evaluate on the validation split every N steps (0: only at the end)
    batches: int = 8  # validation batches per evaluation


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 500  # save every N steps (and at the end, and on SIGTERM)
    keep: int = 3  # keep the newest K checkpoints
    async_save: bool = True  # write in the background while training continues


@dataclasses.dataclass(frozen=True)
class LogSection:
    every: int = 10  # metrics every N steps (forces a device sync)
    tensorboard: bool = True
    progress: bool = True  # tqdm progress bar
    plot: bool = True  # loss-curve PNG in the workdir


@dataclasses.dataclass(frozen=True)
class MeshSection:
    shape: tuple[int, int, int] = (1, -1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    devices: int = 0  # use only the first N devices (0: all); for comparisons and debugging
    rules: str | None = None  # a rules table YAML; None: configs/sharding.yaml


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    eval: EvalSection = EvalSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()
    mesh: MeshSection = MeshSection()
    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # global batch (sequences per optimizer step, all processes together)
    grad_accum: int = 1  # micro-batches per step (batch_size must divide by it)
    seed: int = 0  # parameter init and data order
    init_from: str | None = None  # continual pre-training: weights only from this model/workdir

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UserError(f"steps={self.steps} must be >= 1")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise UserError(
                f"batch_size={self.batch_size} must be a positive multiple of "
                f"grad_accum={self.grad_accum}"
            )
        if self.checkpoint.every < 1 or self.log.every < 1:
            raise UserError("checkpoint.every and log.every must be >= 1")
        if self.checkpoint.keep < 1:
            raise UserError(f"checkpoint.keep={self.checkpoint.keep} must be >= 1")
        if self.eval.batches < 1 or self.eval.every < 0 or self.optim.warmup_steps < 0:
            raise UserError("eval.batches must be >= 1, eval.every and optim.warmup_steps >= 0")
        for i, src in enumerate(self.data.sources):
            if not (math.isfinite(src.weight) and src.weight > 0):
                raise UserError(f"data.sources[{i}] ({src.path}): weight {src.weight} must be > 0")


def load_config(path: str | Path | None, overrides: list[dict] | None = None) -> TrainConfig:
    return overlay.load(TrainConfig, path, overrides)


# --- pieces --------------------------------------------------------------------------------------


def model_config(cfg: TrainConfig, vocab_size: int | None) -> ModelConfig:
    vocab = cfg.model.vocab_size or vocab_size
    if vocab is None:
        raise UserError("model.vocab_size is unknown: set it or train on a prepared DATADIR")
    return preset(
        cfg.model.preset,
        vocab_size=vocab,
        dtype=cfg.model.dtype,
        attention_impl=cfg.model.attention_impl,
        remat=cfg.model.remat,
        residual_float32=cfg.model.residual_float32,
    )


def make_optimizer(o: OptimSection, steps: int) -> optax.GradientTransformation:
    if o.schedule == "constant":
        lr = optax.constant_schedule(o.lr)
        if o.warmup_steps:
            lr = optax.join_schedules(
                [optax.linear_schedule(0.0, o.lr, o.warmup_steps), lr], [o.warmup_steps]
            )
    else:
        lr = optax.warmup_cosine_decay_schedule(
            0.0, o.lr, o.warmup_steps, max(steps, o.warmup_steps + 1), o.lr * o.min_lr_ratio
        )
    decay = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    parts.append(optax.adamw(lr, o.b1, o.b2, o.eps, weight_decay=o.weight_decay, mask=decay))
    return optax.chain(*parts), lr


# Fused-loss chunk rows by backend. GPU: one chunk for a 64 x 512 batch ran 1.3-2.5% faster than
# 8192 rows on an H200 (fewer passes over the float32 d-embedding carry); the logits and p of the
# chunk then take 4.2 GB in bf16. TPU keeps 8192 for its smaller HBM; CPU: 256-2048 measured alike.
_LOSS_CHUNK_ROWS = {"cpu": 1024, "gpu": 32768}


def default_loss_chunk_rows(platform: str | None = None) -> int:
    """Fused-loss chunk rows for `platform` (jax's default backend if None)."""
    return _LOSS_CHUNK_ROWS.get(platform or jax.default_backend(), 8192)


def next_token_loss(
    model: GPTNeo, tokens_bt1: jax.Array, impl: str = "fused", rows: int = 0
) -> jax.Array:
    """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1] (float32).

    `fused` never materialises the [B, T, V] logits (jaxlm.loss); `plain` is the textbook form."""
    targets_bt = tokens_bt1[:, 1:]
    if impl == "fused":
        x_btd = model(tokens_bt1[:, :-1], head=False)
        rows = rows or default_loss_chunk_rows()
        return linear_cross_entropy(x_btd, model.wte_vd[...], targets_bt, model.cfg.dtype, rows)
    logits_btv = model(tokens_bt1[:, :-1])
    logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    gold_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return jnp.mean(logz_bt - gold_bt)


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    grad_accum: int,
    loss_impl: str = "fused",
    loss_chunk_rows: int = 0,
):
    """(params, opt_state, tokens [B, T+1]) -> (params, opt_state, metrics); pure, for jax.jit."""

    def loss_fn(params, tokens):
        model = nnx.merge(graphdef, params)
        return next_token_loss(model, tokens, loss_impl, loss_chunk_rows)

    def step(params, opt_state, tokens_bt1):
        if grad_accum == 1:
            loss, grads = jax.value_and_grad(loss_fn)(params, tokens_bt1)
        else:
            micro = tokens_bt1.reshape(grad_accum, -1, tokens_bt1.shape[-1])  # [A, B/A, T+1]

            def one(carry, tokens):
                loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(one, zero, micro)
            loss, grads = jax.tree.map(lambda x: x / grad_accum, (loss, grads))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # the norm after the update: a non-finite one must stop the run before it is saved
        metrics = {"loss": loss, "grad_norm": grad_norm, "param_norm": optax.tree.norm(params)}
        return params, opt_state, metrics

    return step


def _jit_train_step(
    graphdef, tx, cfg: TrainConfig, param_sh, opt_sh, tokens_sh, platform: str | None = None
):
    """The train step jitted with its shardings, parameters and optimizer state donated: one
    definition for training and for the ahead-of-time compile checks, so they compile the same.
    `platform` (default: jax's backend) picks the loss chunk and XLA options, so an AOT compile
    for a TPU from a CPU host gets the TPU's."""
    platform = platform or jax.default_backend()
    rows = cfg.model.loss_chunk_rows or default_loss_chunk_rows(platform)
    step = make_train_step(graphdef, tx, cfg.grad_accum, cfg.model.loss_impl, rows)
    return jax.jit(
        step,
        in_shardings=(param_sh, opt_sh, tokens_sh),
        out_shardings=(param_sh, opt_sh, None),
        donate_argnums=(0, 1),
        compiler_options=compiler_options(platform),
    )


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x parameters in matmuls + attention (PaLM appendix B)."""
    matmul_params = cfg.n_layers * (4 * cfg.d_model**2 + 2 * cfg.d_model * cfg.d_ff)
    matmul_params += cfg.vocab_size * cfg.d_model  # the tied output projection
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.d_model * seq_len


_PEAK_FLOPS = {  # dense bf16 per chip
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}  # fmt: skip


def peak_flops(device: jax.Device) -> float | None:
    kind = device.device_kind
    for name, flops in sorted(_PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return flops
    return None


# --- the run -------------------------------------------------------------------------------------


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class _Run:
    cfg: TrainConfig
    workdir: Path
    mesh: Mesh
    model_cfg: ModelConfig
    tokenizer: str | None
    seq_len: int
    rules: tuple
    val_sources: list[tuple[str, float]]  # the first source with validation rows, or none
    tokenizer_sha: str  # sha256 of the data's tokenizer model


def _maybe_init_distributed() -> None:
    """Join a multi-host run when the environment describes one (TPU pods, or explicit vars)."""
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAXLM_COORDINATOR"):
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU collectives across processes
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAXLM_COORDINATOR"],
            num_processes=int(os.environ["JAXLM_NUM_PROCESSES"]),
            process_id=int(os.environ["JAXLM_PROCESS_ID"]),
        )
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1 or os.environ.get(
        "MEGASCALE_COORDINATOR_ADDRESS"
    ):
        jax.distributed.initialize()  # Cloud TPU VMs: everything comes from the metadata server


def _data_sources(cfg: TrainConfig) -> list[tuple[str, float]]:
    if not cfg.data.sources:
        raise UserError("no training data: pass --data DATADIR[:WEIGHT] or set data.sources")
    return [(s.path, s.weight) for s in cfg.data.sources]


def _setup(cfg: TrainConfig, workdir: Path) -> _Run:
    from jaxlm.data.pipeline import common_tokenizer, read_metadata

    _maybe_init_distributed()
    rules = load_rules(cfg.mesh.rules) if cfg.mesh.rules else DEFAULT_RULES
    mesh = make_mesh(
        cfg.mesh.shape, jax.devices()[: cfg.mesh.devices] if cfg.mesh.devices else None
    )
    metas = [read_metadata(p) for p, _ in _data_sources(cfg)]
    tok = common_tokenizer(metas)
    seq_lens = {m["seq_len"] for m in metas}
    if len(seq_lens) > 1:
        raise UserError(f"the data sources have different seq_len: {sorted(seq_lens)}")
    model_cfg = model_config(cfg, tok["vocab_size"])
    if model_cfg.vocab_size < tok["vocab_size"]:
        raise UserError(
            f"model.vocab_size={model_cfg.vocab_size} < the tokenizer's {tok['vocab_size']}"
        )
    seq_len = seq_lens.pop()
    if seq_len > model_cfg.max_positions:  # positions past the table would be clamped silently
        raise UserError(
            f"{_data_sources(cfg)[0][0]}: seq_len={seq_len} exceeds model {cfg.model.preset}'s "
            f"{model_cfg.max_positions} positions; prepare the data with a shorter --seq-len"
        )
    # Validation: the first source with a validation split (a tiny native set may have none).
    val_sources = [
        src for src, m in zip(_data_sources(cfg), metas, strict=True)
        if m["splits"].get("validation", {}).get("rows", 0) > 0
    ][:1]  # fmt: skip
    return _Run(
        cfg, workdir, mesh, model_cfg, tok.get("path"), seq_len, rules, val_sources, tok["sha256"]
    )


def _architecture(m: ModelConfig) -> ModelConfig:
    """The config less its COMPUTE_FIELDS, which a resumed or continued run may change: they
    leave the parameters as they are."""
    return m.replace(
        **{f.name: f.default for f in dataclasses.fields(m) if f.name in COMPUTE_FIELDS}
    )


def _init_params(run: _Run):
    """Fresh parameters, or (continual pre-training) the weights of `init_from`, sharded."""
    cfg = run.cfg
    if cfg.init_from:
        model, info = load_model(cfg.init_from, mesh=run.mesh, rules=run.rules)
        if _architecture(model.cfg) != _architecture(run.model_cfg):
            raise UserError(
                f"--init-from {cfg.init_from}: its architecture differs from model.preset="
                f"{cfg.model.preset} with vocab_size={run.model_cfg.vocab_size}"
            )
        check_data_tokenizer(f"--init-from {cfg.init_from}", info.tokenizer, run.tokenizer_sha)
        log.info("initialised from %s (%s, step %s)", cfg.init_from, info.source, info.step)
        graphdef, params = nnx.split(model, nnx.Param)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: GPTNeo(run.model_cfg, rngs=nnx.Rngs(0))))
        return graphdef, params
    model = init_model(run.model_cfg, cfg.seed, mesh=run.mesh, rules=run.rules)
    return nnx.split(model, nnx.Param)


def _to_global(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, local)


def _save(mngr, step, params, opt_state, loader, extra) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
            opt_state=ocp.args.StandardSave(opt_state),
            data=ocp.args.JsonSave(loader.get_state()),
            meta=ocp.args.JsonSave({"step": step, **extra}),
        ),
        force=True,
    )


def _check_saved_optimizer(mngr, step: int, cfg: TrainConfig, params, opt_state) -> None:
    """Raise if checkpoint `step` was saved by a config whose optimizer state has another shape
    than `cfg`'s (clipping turned on or off, say): that checkpoint is fine, the config is not, and
    setting it aside as unreadable would silently restart the run from step 0."""
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        saved = load_config(None, [meta["config"]])
    except Exception:  # no readable config in it: a torn checkpoint, the caller sets it aside
        return
    tx, _ = make_optimizer(saved.optim, saved.steps)
    want = jax.eval_shape(tx.init, params)
    shape = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
    if jax.tree.structure(want) == jax.tree.structure(opt_state) and shape(want) == shape(
        opt_state
    ):
        return
    changed = [f"optim.{f.name}" for f in dataclasses.fields(OptimSection)
               if getattr(saved.optim, f.name) != getattr(cfg.optim, f.name)]  # fmt: skip
    raise UserError(
        f"{Path(mngr.directory) / str(step)} was saved with another optimizer ("
        f"{', '.join(changed) or 'settings'} differ): rerun with its settings, or use a new "
        f"--workdir (add --init-from {Path(mngr.directory).parent} to keep its weights)"
    )


def _restore(mngr, cfg: TrainConfig, params, opt_state, loader):
    """Newest readable checkpoint into (params, opt_state, loader); falls back on bad ones."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            p_target = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                nnx.to_pure_dict(params),
            )
            o_target = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), opt_state
            )
            out = mngr.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(p_target),
                    opt_state=ocp.args.StandardRestore(o_target),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # torn or unreadable: set it aside and take the one before
            _check_saved_optimizer(mngr, step, cfg, params, opt_state)
            bad = (
                Path(mngr.directory).parent
                / "checkpoints.unreadable"
                / f"{step}-{int(time.time())}"
            )
            log.warning(
                "checkpoint %d unreadable (%s: %s); moved to %s, trying the previous one",
                step,
                type(e).__name__,
                str(e).splitlines()[0][:200],
                bad,
            )
            if jax.process_index() == 0:
                bad.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(Path(mngr.directory) / str(step)), bad)
            mngr.reload()
            continue
        nnx.replace_by_pure_dict(params, out["params"])
        loader.set_state(out["data"])
        return step, params, out["opt_state"]
    return 0, params, opt_state


class _Preemption:
    """SIGTERM (a TPU preemption notice): the loop saves and exits at a step that every host
    agrees on. One process: our handler sets a flag, read at the next step. Several: the notice
    reaches hosts at different steps, and a host that saved alone would wait in Orbax's barrier
    while the others wait in the next step's collectives; JAX's preemption service (the
    coordination service's own SIGTERM handler, so ours is not installed) propagates the notice
    and names the first step all hosts can stop at."""

    def __init__(self, multihost: bool):
        self.multihost = multihost
        self.requested = False
        self._prev = None

    def __enter__(self):
        def handler(signum, frame):
            self.requested = True

        if not self.multihost:
            try:
                self._prev = signal.signal(signal.SIGTERM, handler)
            except ValueError:  # not the main thread
                self._prev = None
        return self

    def stop_at(self, step: int) -> bool:
        """Whether to save and exit after `step`; call it once after every step, on every host."""
        if self.multihost:
            from jax.experimental import multihost_utils

            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)


def train(cfg: TrainConfig, workdir: str | Path) -> dict:
    """Train (or resume) in `workdir`; returns the final metrics."""
    from jaxlm.data.pipeline import make_loader
    from jaxlm.metrics_log import MetricsLog

    if "://" in str(workdir):  # Path() would make gs://B/x a local folder gs:/B/x
        raise UserError(f"--workdir {workdir}: a file-system path, e.g. a gcsfuse mount")
    workdir = Path(workdir).resolve()
    run = _setup(cfg, workdir)
    pid, nproc = jax.process_index(), jax.process_count()
    dp = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
    if (cfg.batch_size // cfg.grad_accum) % dp:
        raise UserError(
            f"batch_size={cfg.batch_size} (per micro-batch {cfg.batch_size // cfg.grad_accum}) "
            f"must divide by the {dp} data-parallel devices of mesh {dict(run.mesh.shape)}; "
            "change batch_size or mesh.shape/mesh.devices"
        )
    if cfg.batch_size % nproc:
        raise UserError(f"batch_size={cfg.batch_size} must divide by the {nproc} processes")
    if (workdir / "jaxlm_model.json").exists():
        old_cfg, _ = read_meta(workdir)
        if _architecture(old_cfg) != _architecture(run.model_cfg):
            raise UserError(f"{workdir} holds a run of another architecture; use a new --workdir")
    if pid == 0:
        workdir.mkdir(parents=True, exist_ok=True)

    # data
    loader = make_loader(
        _data_sources(cfg),
        split="train",
        batch_size=cfg.batch_size // nproc,
        seed=cfg.seed,
        process_index=pid,
        process_count=nproc,
        worker_count=cfg.data.worker_count,
        slice_global_batch=True,  # the same data whatever the number of hosts
    )
    tokens_sharding = batch_sharding(run.mesh, 2, run.rules)

    # model and optimizer
    tx, lr_schedule = make_optimizer(cfg.optim, cfg.steps)
    graphdef, params = _init_params(run)  # outside the mesh context: eval_shape needs no mesh
    with use_mesh(run.mesh, run.rules):
        p_sh = jax.tree.map(lambda x: x.sharding, params)
        opt_sh = _opt_shardings(jax.eval_shape(tx.init, params), params, p_sh, run.mesh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    mngr = checkpoint_manager(
        workdir / "checkpoints",
        max_to_keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save,
    )
    start, params, opt_state = _restore(mngr, cfg, params, opt_state, loader)
    if start:
        log.info("resumed from step %d in %s", start, workdir)
    if pid == 0:  # after every check: a refused run leaves the workdir's own model and config
        write_meta(workdir, run.model_cfg, run.tokenizer, seq_len=run.seq_len)
        (workdir / "config.json").write_text(json.dumps(overlay.to_dict(cfg), indent=2) + "\n")
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    opt_sh = jax.tree.map(lambda x: x.sharding, opt_state)
    step_fn = _jit_train_step(graphdef, tx, cfg, param_sh, opt_sh, tokens_sharding)
    eval_fn = jax.jit(
        lambda p, t: next_token_loss(
            nnx.merge(graphdef, p), t, cfg.model.loss_impl, cfg.model.loss_chunk_rows
        ),
        in_shardings=(param_sh, tokens_sharding),
        compiler_options=compiler_options(),
    )

    val_sources = run.val_sources
    if not val_sources:
        log.warning("no data source has validation rows: evaluation is skipped")

    def evaluate() -> float | None:
        if not val_sources:
            return None
        val = make_loader(
            val_sources,
            split="validation",
            batch_size=cfg.batch_size // nproc,
            seed=0,
            process_index=pid,
            process_count=nproc,
            shuffle=False,
            num_epochs=None,
            slice_global_batch=True,
        )
        losses = []
        with use_mesh(run.mesh, run.rules):
            for _, batch in zip(range(cfg.eval.batches), val, strict=False):
                losses.append(eval_fn(params, _to_global(batch["tokens"], tokens_sharding)))
        return float(np.mean([float(x) for x in losses]))

    # the loop
    mlog = MetricsLog(
        workdir,
        enabled=pid == 0,
        tensorboard=cfg.log.tensorboard,
        progress=cfg.log.progress,
        total=cfg.steps,
        initial=start,
    )
    fpt = flops_per_token(run.model_cfg, run.seq_len)
    peak = peak_flops(jax.devices()[0])
    tokens_per_step = cfg.batch_size * run.seq_len
    pending: list[tuple[int, dict, int]] = []
    last_good = start
    final: dict = {}
    t0, t0_step = time.perf_counter(), start

    def flush(step: int) -> None:
        nonlocal t0, t0_step, last_good, final
        for s, m, crc in pending:
            loss, gnorm, pnorm = (float(m[k]) for k in ("loss", "grad_norm", "param_norm"))
            if not all(map(math.isfinite, (loss, gnorm, pnorm))):
                mngr.wait_until_finished()
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                what = what if math.isfinite(pnorm) else "parameter norm after the update"
                good = (
                    f"The last good checkpoint is step {last_good} in {workdir / 'checkpoints'}"
                    if last_good
                    else "No checkpoint was saved"
                )
                raise TrainingDiverged(
                    f"{what} is not finite at step {s}; stopped. {good} (try a lower optim.lr)"
                )
            final = {
                "step": s,
                "loss": loss,
                "grad_norm": gnorm,
                "param_norm": pnorm,
                "data_crc": crc,
                "lr": float(lr_schedule(s - 1)),
            }
        if pending:
            dt = time.perf_counter() - t0
            tps = tokens_per_step * (step - t0_step) / max(dt, 1e-9)
            final.update(
                tokens_per_s=tps,
                perplexity=math.exp(min(final["loss"], 50.0)),
                mfu=(tps * fpt / (peak * run.mesh.size)) if peak else None,
                devices=run.mesh.size,
            )
            mlog.write(
                final,
                step_rows=[
                    {"step": s, "loss": float(m["loss"]), "data_crc": c} for s, m, c in pending
                ],
            )
            t0, t0_step = time.perf_counter(), step
        pending.clear()

    with _Preemption(multihost=nproc > 1) as preempt, use_mesh(run.mesh, run.rules):
        step = start
        while step < cfg.steps:
            batch = next(loader)["tokens"]
            crc = zlib.crc32(batch.tobytes())
            params, opt_state, metrics = step_fn(
                params, opt_state, _to_global(batch, tokens_sharding)
            )
            step += 1
            pending.append((step, metrics, crc))
            mlog.advance()
            if step % cfg.log.every == 0 or step == cfg.steps:
                flush(step)
            if val_sources and cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.steps:
                mlog.write({"step": step, "eval_loss": evaluate()})
            stop = preempt.stop_at(step)
            if step % cfg.checkpoint.every == 0 or step == cfg.steps or stop:
                flush(step)
                extra = {"loss": final.get("loss"), "tokenizer": run.tokenizer,
                         "config": overlay.to_dict(cfg)}  # fmt: skip
                _save(mngr, step, params, opt_state, loader, extra)
                last_good = step
            if stop:
                mngr.wait_until_finished()
                mlog.note(f"SIGTERM: saved step {step} to {workdir / 'checkpoints'}; exiting")
                mlog.close(plot=cfg.log.plot)
                return {**final, "preempted": True}
    mngr.wait_until_finished()
    final["eval_loss"] = evaluate()
    if final["eval_loss"] is not None:
        mlog.write({"step": step, "eval_loss": final["eval_loss"]})
    mlog.close(plot=cfg.log.plot)
    mngr.close()
    return final


def abstract_train_step(
    cfg: TrainConfig,
    mesh: Mesh,
    global_batch: int | None = None,
    seq_len: int = 512,
    rules=DEFAULT_RULES,
):
    """The jitted train step and its ShapeDtypeStruct arguments on `mesh`, for AOT compiles."""
    from jaxlm.sharding import param_shardings

    model_cfg = model_config(cfg, cfg.model.vocab_size or 32000)
    tx, _ = make_optimizer(cfg.optim, cfg.steps)
    abstract = nnx.eval_shape(lambda: GPTNeo(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    params_sds = jax.tree.map(
        lambda s, v: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
        param_shardings(params, mesh, rules),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    p_sh = jax.tree.map(lambda x: x.sharding, params_sds)
    opt_abstract = jax.eval_shape(tx.init, params_sds)
    opt_sh = _opt_shardings(opt_abstract, params_sds, p_sh, mesh)
    opt_sds = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_abstract, opt_sh
    )
    B = global_batch or cfg.batch_size
    tok_sh = batch_sharding(mesh, 2, rules)
    tokens = jax.ShapeDtypeStruct((B, seq_len + 1), jnp.int32, sharding=tok_sh)
    step = _jit_train_step(graphdef, tx, cfg, p_sh, opt_sh, tok_sh, mesh.devices.flat[0].platform)
    return _MeshJit(step, mesh, rules), (params_sds, opt_sds, tokens)


def _opt_shardings(opt_abstract, params, p_sh, mesh):
    """Optimizer moments shard like their parameters; scalars (counts) are replicated."""
    by_shape_path = {}
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


class _MeshJit:
    """A jitted function that lowers inside its mesh context (activation constraints need it)."""

    def __init__(self, fn, mesh, rules):
        self.fn, self.mesh, self.rules = fn, mesh, rules

    def lower(self, *args):
        with use_mesh(self.mesh, self.rules):
            return self.fn.lower(*args)

    def __call__(self, *args):
        with use_mesh(self.mesh, self.rules):
            return self.fn(*args)
