"""Orbax checkpoints of jaxlm models, and one loader for every kind of model directory.

A model directory (`jaxlm init`, `jaxlm export`) holds `jaxlm_model.json` (config, tokenizer
reference) and `params/` (an Orbax StandardCheckpointer tree of the parameters as a pure dict).
A training workdir holds the same `jaxlm_model.json` and `checkpoints/<step>/{params,...}` written
by an Orbax CheckpointManager. `load_model` accepts either, or a Hugging Face GPT-Neo directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from jaxlm import hf
from jaxlm.config import ModelConfig
from jaxlm.errors import UserError
from jaxlm.model import GPTNeo
from jaxlm.sharding import DEFAULT_RULES, Rules, param_shardings

log = logging.getLogger(__name__)
META = "jaxlm_model.json"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Where a loaded model came from and what goes with it."""

    source: str  # "model" | "workdir" | "hf"
    path: str
    tokenizer: str | None = None  # a tokenizer directory, when one is known
    step: int | None = None  # training step, for workdirs
    hf_token_ids: dict | None = None  # a Hugging Face source's bos/eos/pad ids, as save_hf takes


def write_meta(
    directory: str | Path, cfg: ModelConfig, tokenizer: str | None = None, **extra: Any
) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": 1,
        "model": cfg.to_dict(),
        "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None,
        **extra,
    }
    (d / META).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    p = Path(directory) / META
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: cannot read ({e})") from None
    return ModelConfig.from_dict(meta["model"], where=f"{p}: model"), meta


def params_tree(model: GPTNeo) -> dict:
    """The parameters as a plain nested dict: what goes into Orbax."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_params(cfg: ModelConfig, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES):
    """(graphdef, abstract state, pure-dict target of ShapeDtypeStructs with shardings)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPTNeo(cfg, rngs=nnx.Rngs(0))))
    if mesh is not None:
        shardings = nnx.to_pure_dict(param_shardings(state, mesh, rules))
    else:
        one = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, nnx.to_pure_dict(state))
    target = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(state),
        shardings,
    )
    return graphdef, state, target


def merge_params(graphdef, state, restored: dict) -> GPTNeo:
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def save_model(
    out_dir: str | Path, model: GPTNeo, *, tokenizer: str | None = None, **extra: Any
) -> Path:
    out = Path(out_dir).resolve()
    if (out / "params").exists():
        raise UserError(f"{out}/params already exists; choose a new --out or remove it")
    write_meta(out, model.cfg, tokenizer, **extra)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", params_tree(model))
        ckptr.wait_until_finished()
    return out


def _load_model_dir(d: Path, mesh: Mesh | None, rules: Rules) -> GPTNeo:
    cfg, _ = read_meta(d)
    graphdef, state, target = abstract_params(cfg, mesh, rules)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(d.resolve() / "params", target)
    return merge_params(graphdef, state, restored)


def checkpoint_manager(
    ckpt_dir: str | Path,
    *,
    max_to_keep: int | None = None,
    save_interval_steps: int = 1,
    async_save: bool = True,
) -> ocp.CheckpointManager:
    """The CheckpointManager layout every training workdir uses."""
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(
        Path(ckpt_dir).resolve(), options=opts, item_names=("params", "opt_state", "data", "meta")
    )


def restore_workdir_params(
    workdir: Path, cfg: ModelConfig, mesh: Mesh | None, rules: Rules, step: int | None = None
) -> tuple[GPTNeo, int]:
    """Parameters of the latest readable step (falling back to older ones with a warning)."""
    mngr = checkpoint_manager(workdir / "checkpoints", async_save=False)
    steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
    if not steps:
        raise UserError(f"{workdir}: no checkpoints yet under {workdir / 'checkpoints'}")
    graphdef, state, target = abstract_params(cfg, mesh, rules)
    for s in steps:
        try:
            out = mngr.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
            return merge_params(graphdef, state, out["params"]), s
        except Exception as e:  # a torn or unreadable checkpoint: try the previous one
            log.warning(
                "checkpoint step %d in %s unreadable (%s); trying an older one", s, workdir, e
            )
    raise UserError(f"{workdir}: no readable checkpoint among steps {steps}")


def load_model(
    path: str | Path, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES
) -> tuple[GPTNeo, ModelInfo]:
    """A jaxlm model directory, a training workdir, or a Hugging Face GPT-Neo directory."""
    d = Path(path)
    if not d.exists():
        raise UserError(f"{d}: no such checkpoint directory")
    if (d / META).is_file() and (d / "checkpoints").is_dir():
        cfg, meta = read_meta(d)
        model, step = restore_workdir_params(d, cfg, mesh, rules)
        return model, ModelInfo("workdir", str(d), meta.get("tokenizer"), step)
    if (d / META).is_file() and (d / "params").is_dir():
        _, meta = read_meta(d)
        info = ModelInfo("model", str(d), meta.get("tokenizer"), None, meta.get("hf_token_ids"))
        return _load_model_dir(d, mesh, rules), info
    if hf.is_hf_dir(d):
        model = hf.load_hf(d)
        if mesh is not None:
            from jaxlm.model import shard_model

            model = shard_model(model, mesh, rules)
        tok = str(d / "jaxlm_tokenizer") if (d / "jaxlm_tokenizer").is_dir() else None
        return model, ModelInfo("hf", str(d), tok, None, hf.token_ids(d))
    raise UserError(
        f"{d}: not a jaxlm model directory ({META} + params/), a training workdir "
        f"({META} + checkpoints/), or a Hugging Face GPT-Neo directory (config.json)"
    )
