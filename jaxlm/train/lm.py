"""Pretraining and continual pre-training: one jitted, sharded train step and a resumable loop.

`train(cfg, workdir)` reads top to bottom in phases: distributed set-up and mesh, data, model and
optimizer (fresh, restored from the workdir, or initialised from another model), then the loop.
Rerunning the same command resumes from the newest readable checkpoint, with the data iterator
restored too, so an interrupted run ends bitwise equal to an uninterrupted one on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import zlib
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxlm import overlay
from jaxlm.checkpoint import (
    META,
    Checkpoints,
    ModelInfo,
    load_model,
    model_identity,
    read_meta,
    write_meta,
)
from jaxlm.config import COMPUTE_FIELDS, ModelConfig, preset
from jaxlm.errors import UserError
from jaxlm.loss import linear_cross_entropy
from jaxlm.model import GPTNeo, init_model
from jaxlm.outputs import Output, differences, read_identity
from jaxlm.sharding import (
    DEFAULT_RULES,
    Rules,
    batch_sharding,
    load_rules,
    make_mesh,
    opt_state_shardings,
    use_mesh,
)
from jaxlm.tokenizer import check_data_tokenizer
from jaxlm.train.loop import Loop, init_distributed, run_loop
from jaxlm.train.metrics_log import MetricsLog
from jaxlm.train.sections import (
    CheckpointSection,
    DataSource,
    LogSection,
    MeshSection,
    check_sections,
    read_sources,
    source_identity,
    source_pairs,
)
from jaxlm.xla_options import compiler_options

log = logging.getLogger("jaxlm.train")


# --- configuration -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSection:
    preset: str | None = None  # one of jaxlm.config.PRESETS; None: --init-from's, else ts-1m
    vocab_size: int | None = None  # None: the tokenizer's, from the data's metadata.json
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; weights stay float32
    attention_impl: Literal["xla", "cudnn", "auto"] = "auto"  # auto: cuDNN flash on GPUs in bf16
    remat: bool = False  # recompute blocks in the backward pass to save memory
    residual_float32: bool = False  # bf16: residual stream in float32, as torch autocast
    loss_impl: Literal["fused", "plain"] = "fused"  # fused: output projection + CE in chunks
    loss_chunk_rows: int = 0  # (b, t) rows per fused-loss chunk; 0: default_loss_chunk_rows()


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
    """Validation loss per data source, so repair (native loss falls) and forgetting (translated
    loss rises) show side by side."""

    every: int = 0  # evaluate on the validation split every N steps (0: only at the end)
    batches: int = 8  # validation batches per evaluation and source
    sources: tuple[DataSource, ...] = ()  # DATADIRs to evaluate on; (): the training sources
    at_start: bool = False  # also before the first update (continual pre-training's baseline)


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
        check_sections(self.data.sources, self.checkpoint, self.log)
        if self.eval.batches < 1 or self.eval.every < 0 or self.optim.warmup_steps < 0:
            raise UserError("eval.batches must be >= 1, eval.every and optim.warmup_steps >= 0")


def load_config(path: str | Path | None, overrides: list[dict] | None = None) -> TrainConfig:
    return overlay.load(TrainConfig, path, overrides)


# --- pieces --------------------------------------------------------------------------------------


def model_config(
    cfg: TrainConfig, vocab_size: int | None, source: ModelConfig | None = None
) -> ModelConfig:
    """The model to train: `model.preset` at the data's vocabulary, or (continual pre-training
    with no preset named) the `--init-from` model's own architecture; compute settings from the
    config either way."""
    compute = {k: getattr(cfg.model, k) for k in COMPUTE_FIELDS}
    if source is not None and cfg.model.preset is None:
        if cfg.model.vocab_size not in (None, source.vocab_size):
            raise UserError(f"model.vocab_size={cfg.model.vocab_size}, but --init-from has "
                            f"{source.vocab_size}")  # fmt: skip
        return source.replace(**compute)
    vocab = cfg.model.vocab_size or vocab_size
    if vocab is None:
        raise UserError("model.vocab_size is unknown: set it or train on a prepared DATADIR")
    return preset(cfg.model.preset or "ts-1m", vocab_size=vocab, **compute)


def make_optimizer(
    o: OptimSection, steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
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
        x_btd = model.hidden(tokens_bt1[:, :-1])
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


@dataclasses.dataclass
class _Run:
    """What the set-up found: everything the later phases read."""

    cfg: TrainConfig
    workdir: Path
    mesh: Mesh
    rules: Rules
    sources: list[tuple[str, float]]
    model_cfg: ModelConfig
    tokenizer: str | None  # the data's tokenizer directory
    tokenizer_sha: str  # sha256 of the data's tokenizer model
    seq_len: int
    val_sources: list[str]  # DATADIRs evaluated one by one (each has validation rows)
    init: tuple[GPTNeo, ModelInfo] | None  # continual pre-training: the loaded source model


def train(cfg: TrainConfig, workdir: str | Path, *, overwrite: bool = False) -> dict:
    """Train (or resume) in `workdir`; returns the final metrics. Phases, top to bottom: set-up
    (hosts, mesh, data, the model's config), data loader, state (fresh or from `init_from`),
    resume from the workdir's checkpoints, the run files, the compiled steps, the loop, the
    final evaluation. `overwrite` starts over in a workdir made with other settings."""
    run = _setup(cfg, _workdir_path(workdir))
    with _own(
        run, overwrite
    ):  # the workdir's lock for the whole run; its identity checked or recorded
        return _train(run)


def _train(run: _Run) -> dict:
    cfg = run.cfg
    loader = _train_loader(run)
    tx, lr = make_optimizer(cfg.optim, cfg.steps)
    graphdef, params, opt_state = _init_state(run, tx)
    ckpt = Checkpoints(run.workdir / "checkpoints", trees=("params", "opt_state"),
                       keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)  # fmt: skip
    start, params, opt_state, meta = _resume(run, ckpt, params, opt_state, loader)
    _write_run_files(run)  # after every check: a refused run leaves the workdir as it was
    step_fn, eval_fn, tokens_sh = _compile(run, graphdef, tx, params, opt_state)
    state = {"params": params, "opt_state": opt_state}

    def step(_: int) -> dict:
        batch = next(loader)["tokens"]
        crc = zlib.crc32(batch.tobytes())
        state["params"], state["opt_state"], metrics = step_fn(
            state["params"], state["opt_state"], _to_global(batch, tokens_sh)
        )
        return {**metrics, "data_crc": crc}

    def save(s: int, final: dict) -> None:
        trees = {"params": nnx.to_pure_dict(state["params"]), "opt_state": state["opt_state"]}
        extra = {"loss": final.get("loss"), "tokenizer": run.tokenizer,
                 "config": overlay.to_dict(cfg)}  # fmt: skip
        ckpt.save(s, trees, loader.get_state(), extra)

    per_source = lambda: _evaluate(run, eval_fn, state["params"], tokens_sh)  # noqa: E731
    evaluate = lambda _s: _eval_row(per_source())  # noqa: E731
    mlog = MetricsLog(run.workdir, enabled=jax.process_index() == 0,
                      tensorboard=cfg.log.tensorboard, progress=cfg.log.progress,
                      total=cfg.steps, initial=start)  # fmt: skip
    loop = Loop(
        start=start, steps=cfg.steps, log=cfg.log, checkpoint_every=cfg.checkpoint.every,
        save=save, wait=ckpt.wait, watch=WATCH, summarize=_summarizer(run, lr),
        evaluate=evaluate if run.val_sources else None, eval_every=cfg.eval.every,
        multihost=jax.process_count() > 1,
    )  # fmt: skip
    with use_mesh(run.mesh, run.rules):
        if cfg.eval.at_start and start == 0 and run.val_sources:  # the baseline, before updates
            first = per_source()
            mlog.write({"step": 0, **_eval_row(first)})
            _write_eval(run, "start", first)
        result = run_loop(loop, step, mlog, ckpt.directory)
        final = result.final
        if result.preempted:
            mlog.close(plot=cfg.log.plot)
            return {**final, "preempted": True}
        losses = per_source() if run.val_sources else None
    final["eval_loss"] = next(iter(losses.values()))["loss"] if losses else None
    if losses:
        final["eval_losses"] = losses
        mlog.write({"step": result.step, **_eval_row(losses)})
        _write_eval(run, "end", losses)
    mlog.close(plot=cfg.log.plot)
    ckpt.close()
    return final


# the metrics whose non-finite value stops the run, and what the message calls them
WATCH = {"loss": "loss", "grad_norm": "gradient norm",
         "param_norm": "parameter norm after the update"}  # fmt: skip


def _workdir_path(workdir: str | Path) -> Path:
    if "://" in str(workdir):  # Path() would make gs://B/x a local folder gs:/B/x
        raise UserError(f"--workdir {workdir}: a file-system path, e.g. a gcsfuse mount")
    return Path(workdir).resolve()


def _setup(cfg: TrainConfig, workdir: Path) -> _Run:
    """Hosts, mesh, the data sources' agreement, the model's config and the batch's fit."""
    init_distributed()
    rules = load_rules(cfg.mesh.rules) if cfg.mesh.rules else DEFAULT_RULES
    devices = jax.devices()[: cfg.mesh.devices] if cfg.mesh.devices else None
    mesh = make_mesh(cfg.mesh.shape, devices)
    sources = source_pairs(cfg.data.sources)
    tok, seq_len, metas = read_sources(sources)
    init = load_model(cfg.init_from, mesh=mesh, rules=rules) if cfg.init_from else None
    model_cfg = model_config(cfg, tok["vocab_size"], init[0].cfg if init else None)
    if model_cfg.vocab_size < tok["vocab_size"]:
        raise UserError(
            f"model.vocab_size={model_cfg.vocab_size} < the tokenizer's {tok['vocab_size']}"
        )
    if seq_len > model_cfg.max_positions:  # positions past the table would be clamped silently
        raise UserError(
            f"{sources[0][0]}: seq_len={seq_len} exceeds model {_name(cfg)}'s "
            f"{model_cfg.max_positions} positions; prepare the data with a shorter --seq-len"
        )
    if init is not None:
        _check_init(cfg, init, model_cfg, tok["sha256"])
    _check_batch(cfg, mesh)
    val_sources = _val_sources(cfg, sources, metas, tok)
    return _Run(cfg, workdir, mesh, rules, sources, model_cfg, tok.get("path"), tok["sha256"],
                seq_len, val_sources, init)  # fmt: skip


def _val_sources(cfg: TrainConfig, sources, metas, tok) -> list[str]:
    """The DATADIRs to evaluate on, one by one: `eval.sources` (each must have validation rows
    and the training data's tokenizer and row length), else every training source that has
    validation rows (a tiny native set may have none)."""
    if cfg.eval.sources:
        pairs = [(s.path, 1.0) for s in cfg.eval.sources]
        etok, eseq, emetas = read_sources(pairs)
        if etok["sha256"] != tok["sha256"] or eseq != metas[0]["seq_len"]:
            raise UserError("eval.sources: tokenised with another tokenizer or another seq_len "
                            "than the training data")  # fmt: skip
        for (path, _), m in zip(pairs, emetas, strict=True):
            if not m["splits"].get("validation", {}).get("rows", 0):
                raise UserError(f"eval.sources: {path} has no validation rows")
        return [p for p, _ in pairs]
    found = [
        src for (src, _), m in zip(sources, metas, strict=True)
        if m["splits"].get("validation", {}).get("rows", 0) > 0
    ]  # fmt: skip
    if not found:
        log.warning("no data source has validation rows: evaluation is skipped")
    return found


def _name(cfg: TrainConfig) -> str:
    return cfg.model.preset or ("the --init-from model" if cfg.init_from else "ts-1m")


def _identity(run: _Run) -> dict:
    """The settings that make a training run what it is; a rerun with others is refused. Steps,
    the learning rate, logging and compute settings (dtype, remat, kernels) may change."""
    from jaxlm.data.pipeline import read_metadata

    cfg = run.cfg
    init = model_identity(cfg.init_from) if cfg.init_from else None
    return {
        "architecture": _architecture(run.model_cfg).to_dict(),
        "tokenizer_sha256": run.tokenizer_sha,
        "data": [source_identity(p, w, read_metadata(p)) for p, w in run.sources],
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "init_from": init,
    }


def _own(run: _Run, overwrite: bool = False):
    """The workdir as this run's output (jaxlm.outputs): process 0 locks it and checks or records
    its identity; the other hosts compare the identity read-only."""
    identity = _identity(run)
    if jax.process_index() == 0:
        return Output(run.workdir, kind="train", identity=identity, mode="resume",
                      flag="--workdir", overwrite=overwrite,
                      adopt=lambda p: _legacy(p, run))  # fmt: skip
    saved = read_identity(run.workdir, True)
    if saved is not None and differences(saved.get("identity", {}), identity):
        raise UserError(f"{run.workdir} was made with other settings")
    return contextlib.nullcontext()


def _legacy(workdir: Path, run: _Run) -> bool:
    """A workdir of an earlier jaxlm (no identity.json): taken over when its model matches."""
    if not (workdir / META).is_file():
        return False
    old_cfg, _ = read_meta(workdir)
    return _architecture(old_cfg) == _architecture(run.model_cfg)


def _check_init(cfg: TrainConfig, init, model_cfg: ModelConfig, data_sha: str) -> None:
    model, info = init
    if _architecture(model.cfg) != _architecture(model_cfg):
        raise UserError(
            f"--init-from {cfg.init_from}: its architecture differs from model.preset="
            f"{_name(cfg)} with vocab_size={model_cfg.vocab_size}"
        )
    check_data_tokenizer(f"--init-from {cfg.init_from}", info.tokenizer, data_sha)


def _check_batch(cfg: TrainConfig, mesh: Mesh) -> None:
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if (cfg.batch_size // cfg.grad_accum) % dp:
        raise UserError(
            f"batch_size={cfg.batch_size} (per micro-batch {cfg.batch_size // cfg.grad_accum}) "
            f"must divide by the {dp} data-parallel devices of mesh {dict(mesh.shape)}; "
            "change batch_size or mesh.shape/mesh.devices"
        )
    if cfg.batch_size % jax.process_count():
        raise UserError(
            f"batch_size={cfg.batch_size} must divide by the {jax.process_count()} processes"
        )


def _architecture(m: ModelConfig) -> ModelConfig:
    """The config less its COMPUTE_FIELDS, which a resumed or continued run may change: they
    leave the parameters as they are."""
    return m.replace(
        **{f.name: f.default for f in dataclasses.fields(m) if f.name in COMPUTE_FIELDS}
    )


def _train_loader(run: _Run):
    """This process's slice of every global batch, the same order whatever the host count."""
    from jaxlm.data.pipeline import make_loader

    cfg = run.cfg
    return make_loader(
        run.sources,
        split="train",
        batch_size=cfg.batch_size // jax.process_count(),
        seed=cfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        worker_count=cfg.data.worker_count,
        slice_global_batch=True,
    )


def _init_state(run: _Run, tx: optax.GradientTransformation):
    """(graphdef, params, opt_state), sharded by the rules: fresh parameters, or (continual
    pre-training) the weights of `init_from` with a fresh optimizer."""
    if run.init is not None:
        model, info = run.init
        log.info("initialised from %s (%s, step %s)", run.cfg.init_from, info.source, info.step)
        _, params = nnx.split(model, nnx.Param)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: GPTNeo(run.model_cfg, rngs=nnx.Rngs(0))))
    else:  # outside the mesh context: eval_shape needs no mesh
        model = init_model(run.model_cfg, run.cfg.seed, mesh=run.mesh, rules=run.rules)
        graphdef, params = nnx.split(model, nnx.Param)
    with use_mesh(run.mesh, run.rules):
        p_sh = jax.tree.map(lambda x: x.sharding, params)
        opt_sh = opt_state_shardings(jax.eval_shape(tx.init, params), params, p_sh, run.mesh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    return graphdef, params, opt_state


def _resume(run: _Run, ckpt: Checkpoints, params, opt_state, loader):
    """(start step, params, opt_state, meta) from the newest readable checkpoint, if any."""
    like = {"params": nnx.to_pure_dict(params), "opt_state": opt_state}
    shaping = {k: overlay.to_dict(getattr(run.cfg, k)) for k in ("model", "optim")}
    restored = ckpt.restore(like, shaping)
    if restored is None:
        return 0, params, opt_state, {}
    nnx.replace_by_pure_dict(params, restored.trees["params"])
    loader.set_state(restored.data)
    log.info("resumed from step %d in %s", restored.step, run.workdir)
    return restored.step, params, restored.trees["opt_state"], restored.meta


def _write_run_files(run: _Run) -> None:
    if jax.process_index() == 0:
        run.workdir.mkdir(parents=True, exist_ok=True)
        # the data's tokenizer hash, not one computed from its folder: on a TPU slice that
        # folder (recorded by `jaxlm data prepare` where the data was made) is not there
        write_meta(run.workdir, run.model_cfg, run.tokenizer, run.tokenizer_sha,
                   seq_len=run.seq_len)  # fmt: skip
        (run.workdir / "config.json").write_text(
            json.dumps(overlay.to_dict(run.cfg), indent=2) + "\n"
        )


def _compile(run: _Run, graphdef, tx, params, opt_state):
    """The jitted train and eval steps with their shardings, and the batch sharding."""
    cfg = run.cfg
    tokens_sh = batch_sharding(run.mesh, 2, run.rules)
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    opt_sh = jax.tree.map(lambda x: x.sharding, opt_state)
    step_fn = _jit_train_step(graphdef, tx, cfg, param_sh, opt_sh, tokens_sh)
    eval_fn = jax.jit(
        lambda p, t: next_token_loss(
            nnx.merge(graphdef, p), t, cfg.model.loss_impl, cfg.model.loss_chunk_rows
        ),
        in_shardings=(param_sh, tokens_sh),
        compiler_options=compiler_options(),
    )
    return step_fn, eval_fn, tokens_sh


def _evaluate(run: _Run, eval_fn, params, tokens_sh) -> dict[str, dict]:
    """Per source: the mean next-token loss over `eval.batches` validation batches (the same ones
    every time), its perplexity and a 95% interval from the batches' spread."""
    from jaxlm.data.pipeline import make_loader
    from jaxlm.eval.loss import source_names, summarize

    cfg = run.cfg
    out = {}
    for name, path in zip(source_names(run.val_sources), run.val_sources, strict=True):
        val = make_loader(
            [(path, 1.0)],
            split="validation",
            batch_size=cfg.batch_size // jax.process_count(),
            seed=0,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            shuffle=False,
            num_epochs=None,
            slice_global_batch=True,
        )
        losses = [
            eval_fn(params, _to_global(batch["tokens"], tokens_sh))
            for _, batch in zip(range(cfg.eval.batches), val, strict=False)
        ]
        summary = summarize(np.asarray([float(x) for x in losses]), cfg.batch_size * run.seq_len)
        out[name] = {"path": path, **summary, "batches": summary.pop("rows")}
        out[name].pop("tokens")
    return out


def _write_eval(run: _Run, when: str, per_source: dict[str, dict]) -> None:
    """`eval.json` in the workdir: the per-source losses with their intervals at the `start`
    (before any update) and the `end` of the run, for reports."""
    if jax.process_index() != 0:
        return
    path = run.workdir / "eval.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[when] = per_source
    path.write_text(json.dumps(data, indent=1) + "\n")


def _eval_row(per_source: dict[str, dict]) -> dict:
    """A metrics row: `eval_loss` (the first source's: the training data's own) and, per source,
    `eval_loss/NAME` and `eval_ppl/NAME`."""
    row = {"eval_loss": next(iter(per_source.values()))["loss"]}
    for name, r in per_source.items():
        row[f"eval_loss/{name}"] = r["loss"]
        row[f"eval_ppl/{name}"] = r["perplexity"]
    return row


def _summarizer(run: _Run, lr):
    """The summary keys of a logged row: learning rate, throughput, perplexity, MFU."""
    fpt = flops_per_token(run.model_cfg, run.seq_len)
    peak = peak_flops(jax.devices()[0])
    tokens_per_step = run.cfg.batch_size * run.seq_len

    def summarize(row: dict, steps: int, seconds: float) -> dict:
        tps = tokens_per_step * steps / max(seconds, 1e-9)
        return {
            "lr": float(lr(row["step"] - 1)),
            "tokens_per_s": tps,
            "perplexity": math.exp(min(row["loss"], 50.0)),
            "mfu": (tps * fpt / (peak * run.mesh.size)) if peak else None,
            "devices": run.mesh.size,
        }

    return summarize


def _to_global(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, local)


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
    opt_sh = opt_state_shardings(opt_abstract, params_sds, p_sh, mesh)
    opt_sds = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_abstract, opt_sh
    )
    B = global_batch or cfg.batch_size
    tok_sh = batch_sharding(mesh, 2, rules)
    tokens = jax.ShapeDtypeStruct((B, seq_len + 1), jnp.int32, sharding=tok_sh)
    step = _jit_train_step(graphdef, tx, cfg, p_sh, opt_sh, tok_sh, mesh.devices.flat[0].platform)
    return _MeshJit(step, mesh, rules), (params_sds, opt_sds, tokens)


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
