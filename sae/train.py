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

`model.layers` trains one SAE per layer from one activation stream, as EleutherAI's sparsify does
(SAELens trains one hook per run): one model forward per store fill gives every layer's
activations, every layer's buffer is permuted alike, and one jitted step updates every SAE (the
one-layer step, unrolled per layer). Each SAE is exactly the one a one-layer run with the same seed
would train, and is saved as that run would save it, into `out/layer-N` (weights, cfg.json,
sparsity, metrics.jsonl, train_config.json naming that one layer); one checkpoint holds them all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import overlay
from jaxlm.checkpoint import Checkpoints
from jaxlm.errors import UserError
from jaxlm.outputs import Output
from jaxlm.sharding import (
    Rules,
    load_rules,
    make_mesh,
    opt_state_shardings,
    param_shardings,
    use_mesh,
)
from jaxlm.train.loop import Loop, run_loop
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
from sae.base import SAE, SAE_RULES, Buffer, SAEConfig
from sae.registry import create

log = logging.getLogger("sae.train")


# --- configuration -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSection:
    path: str = ""  # a jaxlm model dir, training workdir or Hugging Face GPT-Neo dir
    layer: int = 0  # read blocks.{layer}.mlp.hook_post (the MLP hidden state after gelu)
    # one SAE per layer from one forward, each saved into OUT/layer-N ("all": every layer);
    # empty: the one SAE of `layer`, saved into OUT
    layers: tuple[int, ...] | Literal["all"] = ()

    def __post_init__(self) -> None:
        if self.layers and self.layer:
            raise UserError(
                f"model.layer={self.layer} and model.layers={self.layers}: set one of them "
                "(--layer N trains one SAE, --layers 0,1,... one per layer)"
            )
        if isinstance(self.layers, tuple) and len(set(self.layers)) < len(self.layers):
            raise UserError(f"model.layers={list(self.layers)} names a layer twice")

    @property
    def multi(self) -> bool:
        """SAEs on `layers`, each into OUT/layer-N (even one), not the one-layer run's OUT."""
        return bool(self.layers)

    def resolve(self, n_layers: int) -> tuple[int, ...]:
        """The layers to train on, ascending, checked against a model of `n_layers` layers."""
        if self.layers == "all":
            return tuple(range(n_layers))
        layers = tuple(sorted(self.layers)) if self.layers else (self.layer,)
        what = "model.layers" if self.layers else "model.layer"
        for i in layers:
            if not 0 <= i < n_layers:
                raise UserError(f"{what}={i}: the model has layers 0..{n_layers - 1}")
        return layers


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
class EvalSection:
    """SAELens' reconstruction and downstream metrics (`sae.evaluate`: CE loss recovered, KL,
    explained variance, L0, dead and dense latents) of each trained SAE, on held-out rows of every
    training source, written to SAE_DIR/eval.json as `jaxlm sae eval` would (SAELens evaluates at
    the end of training too). rows=0 turns it off.

    `data`: evaluate on these DATADIRs instead of the training sources' held-out rows. Why: a
    small source's validation split can be a handful of rows (the demo's native stories: 4), too
    few for a per-source score with a usable interval, while a held-out evaluation set of the
    same style has hundreds. Not part of the run's identity: evaluating elsewhere does not change
    the SAE."""

    rows: int = 256  # rows (contexts) per data source
    data: tuple[str, ...] = ()  # DATADIRs to evaluate on; empty: the training sources
    batch_size: int = 8
    split: str = "validation"  # the train split when a source has no validation rows
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class SAETrainConfig:
    model: ModelSection = ModelSection()
    sae: SAEConfig = SAEConfig()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    features: FeatureSection = FeatureSection()
    eval: EvalSection = EvalSection()
    checkpoint: CheckpointSection = CheckpointSection(every=1000)
    log: LogSection = LogSection(tensorboard=False)
    mesh: MeshSection = MeshSection()  # latents split over fsdp x tensor
    seed: int = 42  # SAE init, data order and buffer shuffles

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UserError(
                f"data.training_tokens={self.data.training_tokens} is less than one batch of "
                f"data.train_batch_size_tokens={self.data.train_batch_size_tokens}"
            )
        check_sections(self.data.sources, self.checkpoint, self.log)
        if self.features.feature_sampling_window < 1:
            raise UserError("features.feature_sampling_window must be >= 1")
        if self.eval.rows < 0 or self.eval.batch_size < 1:
            raise UserError("eval.rows must be >= 0 (0: no evaluation) and eval.batch_size >= 1")

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


def make_layers_step(graphdef, tx, sae: SAE, cfg: SAETrainConfig, n: int):
    """`make_train_step` for n SAEs in one program: (states, x [L, N, F], step, scale [L]) ->
    (states, metrics), a state and metrics per layer. The one-layer step runs unchanged on each
    layer (unrolled: every SAE keeps its own shardings, and each equals a one-layer run's)."""
    one = make_train_step(graphdef, tx, sae, cfg)

    def step(states, x_lnf, step_i, scale_l):
        outs = [one(*states[i], x_lnf[i], step_i, scale_l[i]) for i in range(n)]
        return tuple(tuple(o[:-1]) for o in outs), tuple(o[-1] for o in outs)

    return step


# --- the run -------------------------------------------------------------------------------------

# the metrics whose non-finite value stops the run
WATCH = {"loss": "SAE loss", "grad_norm": "gradient norm"}


def _check_data_fits(what: str, vocab: int, tokdir: str | None, tok: dict) -> None:
    """The data must be tokenised with the model's tokenizer (activations of other ids would
    train the SAE on nonsense, silently)."""
    from jaxlm.tokenizer import check_data_tokenizer

    if tok["vocab_size"] > vocab:
        raise UserError(
            f"{what}: vocab_size {vocab}, but the data's tokenizer has {tok['vocab_size']}"
        )
    check_data_tokenizer(what, tokdir, tok["sha256"])


def _rules(cfg: SAETrainConfig) -> Rules:
    """The SAE's rules table: a user's table (mesh.rules) plus the SAE's own logical names."""
    if not cfg.mesh.rules:
        return SAE_RULES
    own = tuple(r for r in SAE_RULES if r[0].startswith("sae_"))
    return load_rules(cfg.mesh.rules) + own


def train(cfg: SAETrainConfig, out: str | Path, *, overwrite: bool = False) -> dict:
    """Train (or resume) an SAE into `out`, or with `model.layers` one per layer into
    `out/layer-N`; returns the final metrics (with `model.layers`, each layer's keys prefixed
    `layer-N/`). Phases: mesh, model and activation store, SAEs and optimizer, resume, the loop
    (the trainer skeleton shared with the LM trainer: checkpoints with fallback, SIGTERM,
    non-finite stop, metrics), the final saves."""
    from jaxlm.checkpoint import load_model

    out = Path(out).resolve()
    if not cfg.model.path:
        raise UserError("no model: pass --model M or set model.path")
    sources = source_pairs(cfg.data.sources)
    tok, _, _ = read_sources(sources)  # one tokenizer and one row length, or a refusal
    devices = jax.devices()[: cfg.mesh.devices] if cfg.mesh.devices else None
    mesh = make_mesh(cfg.mesh.shape, devices)
    rules = _rules(cfg)

    # model and activation store
    model, info = load_model(cfg.model.path, mesh=mesh, rules=rules)
    _check_data_fits(f"--model {cfg.model.path}", model.cfg.vocab_size, info.tokenizer, tok)
    if cfg.eval.rows and cfg.eval.data:  # refused now, not after the training it follows
        etok, _, _ = read_sources([(p, 1.0) for p in cfg.eval.data])
        _check_data_fits(f"eval.data {cfg.eval.data[0]}", model.cfg.vocab_size, info.tokenizer,
                         etok)  # fmt: skip
    layers = cfg.model.resolve(model.cfg.n_layers)
    identity = _identity(cfg, layers, sources)
    # the output's lock for the whole run; its identity checked (a rerun with another layer,
    # architecture, model or data is refused) or recorded (jaxlm.outputs)
    with Output(out, kind="sae", identity=identity, mode="resume", overwrite=overwrite):
        return _train(cfg, out, model, info, layers, sources, mesh, rules)


def _identity(cfg: SAETrainConfig, layers, sources) -> dict:
    """What makes an SAE run what it is: the model (where, which step, its architecture and
    tokenizer), the layers, the SAE's architecture and loss settings, the data and the seed. The
    training length, learning rate, logging and checkpoint cadence may change on a rerun."""
    from jaxlm.checkpoint import model_identity
    from jaxlm.data.pipeline import read_metadata

    d = cfg.data
    return {
        "model": model_identity(cfg.model.path),
        "layers": list(layers),
        "sae": overlay.to_dict(cfg.sae),
        "data": [source_identity(p, w, read_metadata(p)) for p, w in sources],
        "context_size": d.context_size,
        "train_batch_size_tokens": d.train_batch_size_tokens,
        "store": [d.store_batch_size_prompts, d.n_batches_in_buffer],
        "seed": cfg.seed,
    }


def _train(cfg: SAETrainConfig, out: Path, model, info, layers, sources, mesh, rules) -> dict:
    from sae.activations import estimate_norm_scaling_factor

    multi = cfg.model.multi
    store = _store(cfg, model, layers, sources, mesh)  # batches [L, N, F]
    _write_train_configs(out, cfg, layers)

    # SAEs, optimizer, resume
    sae_cfg = cfg.sae.with_d_in(model.cfg.d_ff)
    graphdef, states, sae = _init_states(sae_cfg, cfg, mesh, rules, len(layers))
    tx, lr = make_optimizer(cfg.optim, cfg.steps)
    ckpt = Checkpoints(out / "checkpoints", trees=_TREES, keep=cfg.checkpoint.keep,
                       async_save=cfg.checkpoint.async_save)  # fmt: skip
    start, meta = _resume(ckpt, states, layers, store, cfg, out)
    if start:
        scales = list(np.atleast_1d(meta["scaling_factor"]).tolist())
    elif sae_cfg.normalize_activations == "expected_average_only_in":
        factors = estimate_norm_scaling_factor(store, cfg.data.n_batches_for_norm_estimate)
        scales = factors if isinstance(factors, list) else [factors]  # the store is stacked
    else:
        scales = [1.0] * len(layers)
    step_fn = _compile(graphdef, tx, sae, cfg, states)
    del sae  # the step keeps what it needs (the loss weights' schedules)
    scale_l = jnp.asarray(scales, jnp.float32)  # [L]

    def step(i: int) -> dict:
        x_lnf = next(store)
        states[:], metrics = step_fn(tuple(states), x_lnf, jnp.int32(i), scale_l)
        return _named(metrics, layers, multi)

    def save(s: int, final: dict) -> None:
        ckpt.save(s, _trees(states, layers, multi), store.get_state(), {
            "scaling_factor": scales if multi else scales[0], "metrics": final,
            "config": overlay.to_dict(cfg)})  # fmt: skip

    def summarize(row: dict, steps: int, seconds: float) -> dict:
        tps = cfg.data.train_batch_size_tokens * steps / max(seconds, 1e-9)
        return {"lr": float(lr(row["step"] - 1)), "tokens_per_s": tps, "devices": mesh.size}

    def before_step() -> None:
        if store.serial_fill_due:  # the fill's programs have collectives too:
            jax.block_until_ready(states)  # let the last step end first

    mlog = _metrics_log(out, cfg, layers, multi, start)
    loop = Loop(start=start, steps=cfg.steps, log=cfg.log, checkpoint_every=cfg.checkpoint.every,
                save=save, wait=ckpt.wait, watch=_watch(layers, multi), summarize=summarize,
                before_step=before_step,
                initial_metrics=dict(meta.get("metrics") or {}))  # fmt: skip
    with use_mesh(mesh, rules):
        result = run_loop(loop, step, mlog, ckpt.directory)
    ckpt.close()
    mlog.close(plot=cfg.log.plot)
    if result.preempted:
        return {**result.final, "preempted": True}
    trained = []
    for i, layer in enumerate(layers):
        final = _layer_row(result.final, layer) if multi else result.final
        trained.append(_save_final(_sae_dir(out, layer, multi), cfg, layer, graphdef, states[i],
                                   scales[i], store.context_size, final))  # fmt: skip
    if cfg.eval.rows:
        with use_mesh(mesh, rules):
            scores = _evaluate(cfg, out, model, trained, layers, sources, multi)
        return {**result.final, **scores}
    return result.final


def _evaluate(cfg: SAETrainConfig, out: Path, model, saes: list[SAE], layers, sources,
              multi: bool) -> dict:  # fmt: skip
    """Each trained SAE (activation scale folded in, as saved) evaluated on held-out rows and
    written beside it; returns the headline scores, with `layer-N/` prefixes for several."""
    from sae.evaluate import evaluate_layers, save_eval

    e, scores = cfg.eval, {}
    pairs = list(zip(saes, layers, strict=True))
    results = evaluate_layers(model, pairs, e.data or sources, split=e.split, rows=e.rows,
                              batch_size=e.batch_size, seed=e.seed)  # fmt: skip
    for result, layer in zip(results, layers, strict=True):
        d = _sae_dir(out, layer, multi)
        save_eval(d, {"model": str(Path(cfg.model.path).resolve()), "sae": str(d), **result})
        prefix = f"layer-{layer}/" if multi else ""
        for k in ("ce_loss_score", "kl_div_with_sae", "explained_variance", "l0"):
            scores[f"{prefix}eval/{k}"] = result["pooled"][k]
        pooled = result["pooled"]
        logging.info("SAE layer %d: CE loss recovered %s, KL %s", layer,
                     pooled["ce_loss_score"], pooled["kl_div_with_sae"])  # fmt: skip
    return scores


def _store(cfg: SAETrainConfig, model, layers: tuple[int, ...], sources, mesh):
    """The activation store of every layer, from one forward per model batch: [L, N, F]."""
    from sae.activations import ActivationStore

    d = cfg.data
    return ActivationStore(
        model,
        layers,
        sources,
        context_size=d.context_size,
        store_batch_size_prompts=d.store_batch_size_prompts,
        n_batches_in_buffer=d.n_batches_in_buffer,
        train_batch_size_tokens=d.train_batch_size_tokens,
        seed=cfg.seed,
        worker_count=d.worker_count,
        mesh=mesh,
    )


def _sae_dir(out: Path, layer: int, multi: bool) -> Path:
    return out / f"layer-{layer}" if multi else out


def _write_train_configs(out: Path, cfg: SAETrainConfig, layers: tuple[int, ...]) -> None:
    """The run's config into `out`; with several layers, also each SAE's one-layer config (the
    run that trains it alone) into its own directory."""
    out.mkdir(parents=True, exist_ok=True)
    dump = lambda c: json.dumps(overlay.to_dict(c), indent=2) + "\n"  # noqa: E731
    (out / "train_config.json").write_text(dump(cfg))
    if not cfg.model.multi:
        return
    for layer in layers:
        alone = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, layer=layer, layers=())
        )
        (out / f"layer-{layer}").mkdir(exist_ok=True)
        (out / f"layer-{layer}" / "train_config.json").write_text(dump(alone))


# --- metrics of several SAEs ----------------------------------------------------------------------


def _named(metrics: tuple[dict, ...], layers: tuple[int, ...], multi: bool) -> dict:
    """The step's metrics as one row: a one-layer run's keys, or each layer's as `layer-N/key`."""
    if not multi:
        return metrics[0]
    return {f"layer-{n}/{k}": v for n, m in zip(layers, metrics, strict=True) for k, v in m.items()}


def _layer_row(row: dict, layer: int) -> dict:
    """Layer N's view of a several-layer row: its own keys unprefixed, and the run's shared ones
    (step, lr, tokens_per_s, ...): the row a one-layer run would log."""
    mine = f"layer-{layer}/"
    return {
        k.removeprefix(mine): v
        for k, v in row.items()
        if k.startswith(mine) or not k.startswith("layer-")
    }


def _watch(layers: tuple[int, ...], multi: bool) -> dict[str, str]:
    if not multi:
        return WATCH
    return {f"layer-{n}/{k}": f"layer {n}'s {what}" for n in layers for k, what in WATCH.items()}


class _LayerLogs:
    """The loop's metrics log for several SAEs: each layer's rows go into `out/layer-N` as a
    one-layer run writes them (metrics.jsonl, TensorBoard, loss.png); one progress bar."""

    def __init__(self, out: Path, cfg: SAETrainConfig, layers: tuple[int, ...], start: int):
        self.logs = {
            n: MetricsLog(out / f"layer-{n}", tensorboard=cfg.log.tensorboard,
                          progress=cfg.log.progress and i == 0, total=cfg.steps, initial=start)
            for i, n in enumerate(layers)
        }  # fmt: skip
        self.first = self.logs[layers[0]]

    def advance(self, n: int = 1) -> None:
        self.first.advance(n)

    def write(self, row: dict, step_rows: list[dict] | None = None) -> None:
        for n, lg in self.logs.items():
            lg.write(_layer_row(row, n), [_layer_row(r, n) for r in step_rows or []])

    def note(self, text: str) -> None:
        self.first.note(text)

    def close(self, plot: bool = True) -> None:
        for lg in self.logs.values():
            lg.close(plot=plot)


def _metrics_log(out: Path, cfg: SAETrainConfig, layers, multi: bool, start: int):
    if multi:
        return _LayerLogs(out, cfg, layers, start)
    return MetricsLog(out, tensorboard=cfg.log.tensorboard, progress=cfg.log.progress,
                      total=cfg.steps, initial=start)  # fmt: skip


# --- state, checkpoints, the compiled step --------------------------------------------------------

# One SAE's state is a tuple (params, buffers, opt_state, stats), the train step's argument order.
# The checkpoint's trees (with several layers, each holds {"layer-N": that SAE's tree})
_TREES = ("params", "opt_state", "stats")


def _layer_trees(state: tuple) -> dict:
    """What a checkpoint holds of one SAE: plain pytrees (the buffers ride with the stats)."""
    params, buffers, opt_state, stats = state
    stats = {**stats, "buffers": nnx.to_pure_dict(buffers)}
    return {"params": nnx.to_pure_dict(params), "opt_state": opt_state, "stats": stats}


def _trees(states: list[tuple], layers: tuple[int, ...], multi: bool) -> dict:
    """One checkpoint of every SAE; a one-layer run's trees are that SAE's own (as before)."""
    per = [_layer_trees(s) for s in states]
    if not multi:
        return per[0]
    return {k: {f"layer-{n}": t[k] for n, t in zip(layers, per, strict=True)} for k in _TREES}


def _init_state(sae_cfg: SAEConfig, cfg: SAETrainConfig, mesh, rules) -> tuple:
    """(graphdef, (params, buffers, opt_state, stats), the SAE), parameters sharded by the
    rules."""
    sae = create(sae_cfg, seed=cfg.seed)
    # flax types a split by several filters as a variadic tuple; two filters give three parts
    graphdef, params, buffers = nnx.split(sae, nnx.Param, Buffer)  # type: ignore[misc]
    tx, _ = make_optimizer(cfg.optim, cfg.steps)
    with use_mesh(mesh, rules):
        p_sh = param_shardings(params, mesh, rules)
        params = jax.device_put(params, p_sh)
        replicated = NamedSharding(mesh, PartitionSpec())
        buffers = jax.device_put(buffers, replicated)
        # Adam's moments sharded like the latents they follow (jit alone replicates them: at
        # 24,576 latents on ts-33m's MLP, 1.2 GB on every chip)
        opt_sh = opt_state_shardings(jax.eval_shape(tx.init, params), params, p_sh, mesh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
        stats = jax.device_put(init_stats(sae_cfg.n_latents), replicated)
    return graphdef, (params, buffers, opt_state, stats), sae


def _init_states(sae_cfg: SAEConfig, cfg: SAETrainConfig, mesh, rules, n: int) -> tuple:
    """(graphdef, [n SAE states], an SAE): each initialised as a one-layer run's (same seed),
    in buffers of its own (the step donates them)."""
    inits = [_init_state(sae_cfg, cfg, mesh, rules) for _ in range(n)]
    return inits[0][0], [st for _, st, _ in inits], inits[0][2]


def _resume(ckpt: Checkpoints, states: list, layers: tuple[int, ...], store, cfg, out: Path):
    """(start step, meta) after restoring the newest readable checkpoint into `states`."""
    multi = cfg.model.multi
    shaping = {k: overlay.to_dict(getattr(cfg, k)) for k in ("model", "sae", "optim")}
    restored = ckpt.restore(_trees(states, layers, multi), shaping)
    if restored is None:
        return 0, {}
    for i, n in enumerate(layers):
        tree = {k: restored.trees[k][f"layer-{n}"] if multi else restored.trees[k] for k in _TREES}
        params, buffers, _, _ = states[i]
        nnx.replace_by_pure_dict(params, tree["params"])
        stats = dict(tree["stats"])
        nnx.replace_by_pure_dict(buffers, stats.pop("buffers"))
        states[i] = (params, buffers, tree["opt_state"], stats)
    store.set_state(restored.data)
    log.info("resumed from step %d in %s", restored.step, out)
    return restored.step, restored.meta


def _compile(graphdef, tx, sae: SAE, cfg: SAETrainConfig, states: list):
    """The jitted step of every SAE, their states donated, with the states' shardings."""
    shardings = jax.tree.map(lambda x: x.sharding, tuple(states))
    return jax.jit(
        make_layers_step(graphdef, tx, sae, cfg, len(states)),
        in_shardings=(shardings, None, None, None),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )


def _save_final(out: Path, cfg: SAETrainConfig, layer: int, graphdef, state: tuple, scale: float,
                context_size: int, final: dict) -> SAE:  # fmt: skip
    """One trained SAE for inference on raw activations, in SAELens's layout; returns it."""
    from sae.io import save_sae

    writable = lambda t: jax.tree.map(np.array, jax.device_get(t))  # noqa: E731  (for the fold)
    params, buffers, _, stats = state
    trained = nnx.merge(graphdef, writable(params), writable(buffers))
    if scale != 1.0:
        trained.fold_activation_scale(scale)
    freq_s = np.asarray(stats["act_freq_s"]) / max(float(stats["n_rows"]), 1.0)
    save_sae(
        out,
        trained,
        layer=layer,
        model_path=str(Path(cfg.model.path).resolve()),
        context_size=context_size,
        log_sparsity_s=np.log10(freq_s + 1e-10),
        extra={
            "steps": cfg.steps,
            "scaling_factor": scale,
            "final_metrics": {k: v for k, v in final.items() if k != "time"},
        },
    )
    return trained
