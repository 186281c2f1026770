"""Training an SAE on a jaxlm model's MLP activations: one jit'd step and a resumable loop.

Defaults are SAELens 6.54.12's (`LanguageModelSAERunnerConfig`, the training SAE configs and
`SAETrainer`): Adam (lr 3e-4, betas 0.9/0.999, no weight decay), gradient-norm clipping at 1.0, a
constant learning rate (optional linear warm-up, cosine annealing, linear decay), loss weights
warmed up linearly from 0, 2M training tokens in batches of 4096, contexts of 128 tokens, 32
contexts per forward, 20 forwards per buffer, latents dead after 1000 steps without firing,
firing frequencies over windows of 2000 steps, seed 42. SAELens 6.x needs `d_sae` set; here
`expansion_factor` 4 (SAELens 4.x's default) gives it when it is not.

`train(cfg, out)` reads in phases: mesh and model, activation store, SAE and optimizer (fresh or
restored from `out/checkpoints`), the loop, the final save (`sae.io`, SAELens's layout) into `out`.
Rerunning the same command resumes; a run killed at any step ends bitwise equal to an
uninterrupted one on CPU (the store's state is checkpointed with the weights).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import overlay
from jaxlm.errors import UserError
from jaxlm.sharding import make_mesh, param_shardings, use_mesh
from sae.base import SAE, SAE_RULES, Buffer, SAEConfig
from sae.registry import create

log = logging.getLogger("sae.train")


# --- configuration -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSection:
    path: str = ""  # a jaxlm model dir, training workdir or Hugging Face GPT-Neo dir
    layer: int = 0  # read blocks.{layer}.mlp.hook_post (the MLP hidden state after gelu)


@dataclasses.dataclass(frozen=True)
class DataSource:
    path: str  # a DATADIR written by `jaxlm data prepare`
    weight: float = 1.0  # relative mixing weight


@dataclasses.dataclass(frozen=True)
class DataSection:
    sources: tuple[DataSource, ...] = ()  # --data DIR[:WEIGHT] replaces these
    context_size: int | None = 128  # tokens per context; None: the data's seq_len
    store_batch_size_prompts: int = 32  # contexts per model forward
    n_batches_in_buffer: int = 20  # forwards pooled and shuffled per buffer
    train_batch_size_tokens: int = 4096  # activation rows per SAE step
    training_tokens: int = 2_000_000  # steps = training_tokens // train_batch_size_tokens
    n_batches_for_norm_estimate: int = 1000  # normalize_activations=expected_average_only_in
    worker_count: int = 0  # Grain worker processes (0: threads)


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_scheduler_name: Literal["constant", "cosineannealing"] = "constant"
    lr_warm_up_steps: int = 0  # linear warm-up from lr / lr_warm_up_steps
    lr_end: float | None = None  # cosine floor and decay start; None: lr / 10
    lr_decay_steps: int = 0  # linear decay to 0 over the last N steps
    clip_norm: float = 1.0  # SAELens clips the global gradient norm at 1.0; 0 turns it off


@dataclasses.dataclass(frozen=True)
class FeatureSection:
    dead_feature_window: int = 1000  # a latent not firing for this many steps is dead
    feature_sampling_window: int = 2000  # firing frequencies are counted over windows this long


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 1000  # save every N steps (and at the end)
    keep: int = 3  # keep the newest K checkpoints
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LogSection:
    every: int = 10  # metrics every N steps (forces a device sync)
    progress: bool = True
    tensorboard: bool = False
    plot: bool = True  # loss.png in the output dir


@dataclasses.dataclass(frozen=True)
class MeshSection:
    shape: tuple[int, int, int] = (1, -1, 1)  # (data, fsdp, tensor); latents split over fsdp*tensor
    devices: int = 0  # use only the first N devices (0: all)


@dataclasses.dataclass(frozen=True)
class SAETrainConfig:
    model: ModelSection = ModelSection()
    sae: SAEConfig = SAEConfig()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    features: FeatureSection = FeatureSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()
    mesh: MeshSection = MeshSection()
    seed: int = 42  # SAE init, data order and buffer shuffles

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UserError(
                f"data.training_tokens={self.data.training_tokens} is less than one batch of "
                f"data.train_batch_size_tokens={self.data.train_batch_size_tokens}"
            )
        if self.checkpoint.every < 1 or self.log.every < 1:
            raise UserError("checkpoint.every and log.every must be >= 1")
        if self.features.feature_sampling_window < 1:
            raise UserError("features.feature_sampling_window must be >= 1")

    @property
    def steps(self) -> int:
        return self.data.training_tokens // max(self.data.train_batch_size_tokens, 1)


def load_config(path: str | Path | None, overrides: list[dict] | None = None) -> SAETrainConfig:
    return overlay.load(SAETrainConfig, path, overrides)


# --- pieces --------------------------------------------------------------------------------------


def lr_schedule(o: OptimSection, steps: int) -> optax.Schedule:
    """SAELens `get_lr_scheduler` (torch LinearLR / CosineAnnealingLR in a SequentialLR)."""
    W, D = o.lr_warm_up_steps, o.lr_decay_steps
    lr_end = o.lr / 10 if o.lr_end is None else o.lr_end
    main_steps = max(steps - W - D, 1)
    decay_from = o.lr if o.lr_scheduler_name == "constant" else lr_end

    def schedule(i):
        i = jnp.asarray(i, jnp.float32)
        warm = o.lr * (1 / W + (1 - 1 / W) * jnp.minimum(i, W - 1) / max(W - 1, 1)) if W else o.lr
        if o.lr_scheduler_name == "constant":
            main = o.lr
        else:
            j = jnp.clip(i - W, 0, main_steps)
            main = lr_end + (o.lr - lr_end) * (1 + jnp.cos(jnp.pi * j / main_steps)) / 2
        lr = jnp.where(i < W, warm, main)
        if D:
            j = jnp.clip(i - (steps - D), 0, D)
            lr = jnp.where(i >= steps - D, decay_from * (1 - j / D), lr)
        return lr

    return schedule


def make_optimizer(
    o: OptimSection, steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    lr = lr_schedule(o, steps)
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    parts.append(optax.adam(lr, o.adam_beta1, o.adam_beta2, eps=1e-8))  # torch.optim.Adam
    return optax.chain(*parts), lr


def init_stats(n_latents: int) -> dict[str, jax.Array]:
    """SAETrainer's running counters (per latent)."""
    return {
        "since_fired_s": jnp.zeros((n_latents,), jnp.float32),  # steps since the latent fired
        "act_freq_s": jnp.zeros((n_latents,), jnp.float32),  # rows it fired on, this window
        "n_rows": jnp.zeros((), jnp.float32),  # rows seen, this window
    }


def make_train_step(graphdef, tx, sae: SAE, cfg: SAETrainConfig):
    """(params, buffers, opt_state, stats, x [N, F], step, scale) -> (..., metrics); pure."""
    schedules = sae.coefficient_schedule()
    window, sampling = cfg.features.dead_feature_window, cfg.features.feature_sampling_window

    def step(params, buffers, opt_state, stats, x_nf, step_i, scale):
        x_nf = x_nf * scale
        coefs = {
            n: v * jnp.minimum(step_i / w, 1.0) if w else jnp.float32(v)
            for n, (v, w) in schedules.items()
        }
        dead_s = stats["since_fired_s"] > window
        sae = nnx.merge(graphdef, params, buffers)
        sae.project()
        params = nnx.state(sae, nnx.Param)

        def loss_fn(p):
            out = nnx.merge(graphdef, p, buffers)(x_nf, coefficients=coefs, dead_s=dead_s)
            return out.loss, out

        (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        sae.after_step(out)
        buffers = nnx.state(sae, Buffer)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)

        fired_ns = out.feature_acts != 0
        reset = (step_i > 0) & (step_i % sampling == 0)
        since = jnp.where(fired_ns.any(0), 0.0, stats["since_fired_s"] + 1)
        stats = {
            "since_fired_s": since,
            "act_freq_s": jnp.where(reset, 0.0, stats["act_freq_s"]) + fired_ns.sum(0),
            "n_rows": jnp.where(reset, 0.0, stats["n_rows"]) + x_nf.shape[0],
        }
        l2_n = jnp.square(out.sae_out - x_nf).sum(-1)
        var_n = jnp.square(x_nf - x_nf.mean(0)).sum(-1)
        freq_s = stats["act_freq_s"] / stats["n_rows"]
        metrics = {
            "loss": out.loss,
            **out.losses,
            "l0": out.l0,
            "explained_variance": 1 - l2_n.mean() / var_n.mean(),
            "dead_features": (since > window).sum(),
            "dense_features": (freq_s > 0.1).sum(),  # firing on more than 10% of rows
            "grad_norm": optax.tree.norm(grads),
            **{f"{n}_coefficient": c for n, c in coefs.items()},
        }
        return params, buffers, opt_state, stats, metrics

    return step


# --- checkpoints ---------------------------------------------------------------------------------

_ITEMS = ("params", "opt_state", "stats", "data", "meta")


def _manager(directory: Path, c: CheckpointSection) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=c.keep, enable_async_checkpointing=c.async_save, create=True
    )
    return ocp.CheckpointManager(directory.resolve(), options=opts, item_names=_ITEMS)


def _target(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _save(mngr, step, state, store, meta) -> None:
    params, buffers, opt_state, stats = state
    mngr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
            opt_state=ocp.args.StandardSave(opt_state),
            stats=ocp.args.StandardSave({**stats, "buffers": nnx.to_pure_dict(buffers)}),
            data=ocp.args.JsonSave(store.get_state()),
            meta=ocp.args.JsonSave({"step": step, **meta}),
        ),
        force=True,
    )


def _restore(mngr, state, store):
    """(step, state, meta) of the newest checkpoint, or (0, state, None) when there is none."""
    step = mngr.latest_step()
    if step is None:
        return 0, state, None
    params, buffers, opt_state, stats = state
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_target(nnx.to_pure_dict(params))),
            opt_state=ocp.args.StandardRestore(_target(opt_state)),
            stats=ocp.args.StandardRestore(
                _target({**stats, "buffers": nnx.to_pure_dict(buffers)})
            ),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ),
    )
    nnx.replace_by_pure_dict(params, out["params"])
    restored_stats = dict(out["stats"])
    nnx.replace_by_pure_dict(buffers, restored_stats.pop("buffers"))
    store.set_state(out["data"])
    return step, (params, buffers, out["opt_state"], restored_stats), out["meta"]


# --- the run -------------------------------------------------------------------------------------


def _data_sources(cfg: SAETrainConfig) -> list[tuple[str, float]]:
    if not cfg.data.sources:
        raise UserError("no data: pass --data DATADIR[:WEIGHT] or set data.sources")
    return [(s.path, s.weight) for s in cfg.data.sources]


def _check_data_fits(what: str, vocab: int, tokdir: str | None, sources) -> None:
    """The data must be tokenised with the model's tokenizer (activations of other ids would
    train the SAE on nonsense, silently)."""
    from jaxlm.data.pipeline import common_tokenizer, read_metadata
    from jaxlm.tokenizer import check_data_tokenizer

    tok = common_tokenizer([read_metadata(p) for p, _ in sources])
    if tok["vocab_size"] > vocab:
        raise UserError(
            f"{what}: vocab_size {vocab}, but the data's tokenizer has {tok['vocab_size']}"
        )
    check_data_tokenizer(what, tokdir, tok["sha256"])


def train(cfg: SAETrainConfig, out: str | Path) -> dict:
    """Train (or resume) an SAE into `out`; returns the final metrics."""
    from jaxlm.checkpoint import load_model
    from jaxlm.metrics_log import MetricsLog
    from sae.activations import ActivationStore, estimate_norm_scaling_factor
    from sae.io import save_sae

    out = Path(out).resolve()
    if not cfg.model.path:
        raise UserError("no model: pass --model M or set model.path")
    sources = _data_sources(cfg)
    devices = jax.devices()[: cfg.mesh.devices] if cfg.mesh.devices else None
    mesh = make_mesh(cfg.mesh.shape, devices)

    # model and activation store
    model, info = load_model(cfg.model.path, mesh=mesh, rules=SAE_RULES)
    _check_data_fits(f"--model {cfg.model.path}", model.cfg.vocab_size, info.tokenizer, sources)
    d = cfg.data
    store = ActivationStore(
        model,
        cfg.model.layer,
        sources,
        context_size=d.context_size,
        store_batch_size_prompts=d.store_batch_size_prompts,
        n_batches_in_buffer=d.n_batches_in_buffer,
        train_batch_size_tokens=d.train_batch_size_tokens,
        seed=cfg.seed,
        worker_count=d.worker_count,
        mesh=mesh,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(overlay.to_dict(cfg), indent=2) + "\n")

    # SAE and optimizer
    sae_cfg = cfg.sae.with_d_in(model.cfg.d_ff)
    sae = create(sae_cfg, seed=cfg.seed)
    graphdef, params, buffers = nnx.split(sae, nnx.Param, Buffer)
    tx, lr = make_optimizer(cfg.optim, cfg.steps)
    with use_mesh(mesh, SAE_RULES):
        params = jax.device_put(params, param_shardings(params, mesh, SAE_RULES))
        replicated = NamedSharding(mesh, PartitionSpec())
        buffers = jax.device_put(buffers, replicated)
        opt_state = jax.jit(tx.init)(params)
        stats = jax.device_put(init_stats(sae_cfg.n_latents), replicated)
    mngr = _manager(out / "checkpoints", cfg.checkpoint)
    start, (params, buffers, opt_state, stats), meta = _restore(
        mngr, (params, buffers, opt_state, stats), store
    )
    if start:
        log.info("resumed from step %d in %s", start, out)
        scale = meta["scaling_factor"]
    elif sae_cfg.normalize_activations == "expected_average_only_in":
        scale = estimate_norm_scaling_factor(store, d.n_batches_for_norm_estimate)
    else:
        scale = 1.0

    shardings = jax.tree.map(lambda x: x.sharding, (params, buffers, opt_state, stats))
    step_fn = jax.jit(
        make_train_step(graphdef, tx, sae, cfg),
        in_shardings=(*shardings, None, None, None),
        out_shardings=(*shardings, None),
        donate_argnums=(0, 1, 2, 3),
    )

    # the loop
    mlog = MetricsLog(out, tensorboard=cfg.log.tensorboard, progress=cfg.log.progress,
                      total=cfg.steps, initial=start)  # fmt: skip
    final: dict = dict(meta.get("metrics") or {}) if start else {}  # a rerun keeps the last ones
    pending: list[tuple[int, dict]] = []
    t0, t0_step = time.perf_counter(), start

    def flush(step: int) -> None:
        nonlocal final, t0, t0_step
        rows = [{"step": s, **{k: float(v) for k, v in m.items()}} for s, m in pending]
        pending.clear()
        if not rows:
            return
        if not math.isfinite(rows[-1]["loss"]):
            raise UserError(f"SAE loss is {rows[-1]['loss']} at step {step}; try a lower optim.lr")
        dt = time.perf_counter() - t0
        tps = d.train_batch_size_tokens * (step - t0_step) / max(dt, 1e-9)
        final = {**rows[-1], "lr": float(lr(step - 1)), "tokens_per_s": tps, "devices": mesh.size}
        mlog.write(final, step_rows=rows)
        t0, t0_step = time.perf_counter(), step

    state = (params, buffers, opt_state, stats)
    with use_mesh(mesh, SAE_RULES):
        step = start
        while step < cfg.steps:
            if store.serial_fill_due:  # the fill's programs have collectives too:
                jax.block_until_ready(state)  # let the last step end first
            x_nf = next(store)
            *state, metrics = step_fn(*state, x_nf, jnp.int32(step), jnp.float32(scale))
            step += 1
            pending.append((step, metrics))
            mlog.advance()
            if step % cfg.log.every == 0 or step == cfg.steps:
                flush(step)
            if step % cfg.checkpoint.every == 0 or step == cfg.steps:
                flush(step)
                _save(mngr, step, state, store, {"scaling_factor": scale, "metrics": final})
    mngr.wait_until_finished()
    mngr.close()
    mlog.close(plot=cfg.log.plot)

    # the final SAE, for inference on raw activations, in SAELens's layout
    params, buffers, _, stats = state
    writable = lambda t: jax.tree.map(np.array, jax.device_get(t))  # noqa: E731  (for the fold)
    trained = nnx.merge(graphdef, writable(params), writable(buffers))
    if scale != 1.0:
        trained.fold_activation_scale(scale)
    freq_s = np.asarray(stats["act_freq_s"]) / max(float(stats["n_rows"]), 1.0)
    save_sae(
        out,
        trained,
        layer=cfg.model.layer,
        model_path=str(Path(cfg.model.path).resolve()),
        context_size=store.context_size,
        log_sparsity_s=np.log10(freq_s + 1e-10),
        extra={
            "steps": cfg.steps,
            "scaling_factor": scale,
            "final_metrics": {k: v for k, v in final.items() if k != "time"},
        },  # fmt: skip
    )
    return final
