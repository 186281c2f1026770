"""Orbax checkpoints of jaxlm models, and one loader for every kind of model directory.

A model directory (`jaxlm init`, `jaxlm export`) holds `jaxlm_model.json` (config, tokenizer
reference) and `params/` (an Orbax StandardCheckpointer tree of the parameters as a pure dict).
A training workdir holds the same `jaxlm_model.json` and `checkpoints/<step>/{params,...}` written
by an Orbax CheckpointManager. `load_model` accepts either, or a Hugging Face GPT-Neo directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping
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
    # sha256 of the tokenizer's model file when the model was saved: `jaxlm.tokenizer.
    # load_recorded` refuses a tokenizer that is not this one (the ids would decode wrongly)
    tokenizer_sha256: str | None = None


def write_meta(
    directory: str | Path,
    cfg: ModelConfig,
    tokenizer: str | None = None,
    tokenizer_sha256: str | None = None,
    **extra: Any,
) -> None:
    """`jaxlm_model.json`: the architecture, and the tokenizer by path and content hash (the hash
    is computed from the tokenizer directory when not given; None, with a warning, when that
    directory cannot be read)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if tokenizer and tokenizer_sha256 is None:
        from jaxlm.tokenizer import tokenizer_sha256 as sha_of

        try:
            tokenizer_sha256 = sha_of(tokenizer)
        except (UserError, OSError) as e:
            log.warning("%s: cannot hash the tokenizer (%s); recorded by path only", d, e)
    meta = {
        "format": 1,
        "model": cfg.to_dict(),
        "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None,
        "tokenizer_sha256": tokenizer_sha256 if tokenizer else None,
        **extra,
    }
    (d / META).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    p = Path(directory) / META
    try:
        meta = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: cannot read ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise UserError(f'{p}: not a jaxlm model metadata file (no "model" object)')
    try:
        return ModelConfig.from_dict(meta["model"], where=f"{p}: model"), meta
    except (TypeError, ValueError) as e:  # a field of the wrong type or value
        if isinstance(e, UserError):
            raise
        raise UserError(f"{p}: model: {e}") from None


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
    ignore_orphaned_writes()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", params_tree(model))
        ckptr.wait_until_finished()
    return out


def _orphaned_write(u: Any) -> bool:
    """An unraisable error from a TensorStore write that outlived its failed save: it completes
    on its own thread and schedules its result on Orbax's event loop, which is already closed."""
    e = u.exc_value
    return isinstance(e, RuntimeError) and str(e) == "Event loop is closed"


def ignore_orphaned_writes() -> None:
    """Drop the "Event loop is closed" errors that a failed save's orphaned writes raise through
    `sys.unraisablehook`, from TensorStore's threads. Installed (once) before jaxlm saves: such a
    write can fail while the save's own error is still being raised, before any handler runs.

    When one array's write fails (a full disk), Orbax's save stops and closes its event loop while
    the save's other writes are still in flight; each then fails to hand back its result, and
    Python prints "Exception ignored in: None ... RuntimeError: Event loop is closed" at some
    later moment, or never, by timing: seen past `jaxlm train`'s one-line error, and as pytest's
    unraisable-exception warning after a full-disk `jaxlm init` in the suite. Nothing is lost: the
    save had already failed and was reported. Every other unraisable error goes to the hook there
    was."""
    previous = sys.unraisablehook
    if getattr(previous, "ignores_orphaned_writes", False):
        return

    def hook(u: Any) -> None:
        if not _orphaned_write(u):
            previous(u)

    hook.ignores_orphaned_writes = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _load_model_dir(d: Path, mesh: Mesh | None, rules: Rules) -> GPTNeo:
    cfg, _ = read_meta(d)
    graphdef, state, target = abstract_params(cfg, mesh, rules)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(d.resolve() / "params", target)
    return merge_params(graphdef, state, restored)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def state_signature(trees: Mapping[str, Any]) -> str:
    """A digest of the state's tree structure, shapes and dtypes: two configs that give the same
    signature can restore each other's checkpoints."""
    parts = []
    for name in sorted(trees):
        leaves, treedef = jax.tree.flatten(trees[name])
        parts.append(f"{name}:{treedef}:{[(tuple(x.shape), str(x.dtype)) for x in leaves]}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


@dataclasses.dataclass
class Restored:
    step: int
    trees: dict[str, Any]
    data: dict
    meta: dict


class Checkpoints:
    """Orbax checkpoints of named state trees + the data state + a JSON meta, in `directory`."""

    def __init__(
        self,
        directory: str | Path,
        *,
        trees: tuple[str, ...],
        keep: int | None = None,
        async_save: bool = True,
        create: bool = True,
    ):
        self.directory = Path(directory).resolve()
        self.trees = trees
        ignore_orphaned_writes()
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=create
        )
        self._mngr = ocp.CheckpointManager(
            self.directory, options=opts, item_names=(*trees, "data", "meta")
        )

    def save(self, step: int, trees: Mapping[str, Any], data: dict, meta: dict) -> None:
        """Save (asynchronously when configured); the meta records the state's signature."""
        args = {k: ocp.args.StandardSave(trees[k]) for k in self.trees}
        meta = {"step": step, "signature": state_signature(trees), **meta}
        args.update(data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta))
        try:  # an asynchronous save's failure (a full disk) surfaces at the next save or wait
            self._mngr.save(step, args=ocp.args.Composite(**args), force=True)
        except Exception as e:
            self._abandon()
            raise SaveFailed(f"{self.directory}: saving step {step} failed ({_why(e)})") from None

    def steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def read(self, step: int, targets: Mapping[str, Any]) -> dict[str, Any]:
        """Some trees of checkpoint `step` (no fallback), into `targets`' ShapeDtypeStructs."""
        args = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
        return dict(self._mngr.restore(step, args=ocp.args.Composite(**args)))

    def read_meta(self, step: int) -> dict | None:
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(out["meta"])
        except Exception:  # a torn checkpoint's meta may be unreadable too
            return None

    def restore(self, like: Mapping[str, Any], config: dict | None = None) -> Restored | None:
        """The newest readable checkpoint restored into the shardings of `like` (the fresh
        state); None when there is none. `config` (the sections of this run's config that shape
        the state, as a dict) names what differs when a whole checkpoint no longer fits."""
        want = state_signature(like)
        for step in sorted(self._mngr.all_steps(), reverse=True):
            args = {k: ocp.args.StandardRestore(_abstract(like[k])) for k in self.trees}
            args.update(data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
            try:
                out = self._mngr.restore(step, args=ocp.args.Composite(**args))
            except Exception as e:  # torn, unreadable, or another state shape
                self._refuse_if_other_shape(step, want, config)
                self._set_aside(step, e)
                continue
            trees = {k: out[k] for k in self.trees}
            return Restored(step, trees, dict(out["data"]), dict(out["meta"]))
        return None

    def _refuse_if_other_shape(self, step: int, want: str, config: dict | None) -> None:
        meta = self.read_meta(step)
        if meta is None or meta.get("signature") in (None, want):
            return  # no readable meta, or the same shape: the checkpoint itself is damaged
        saved = _flat(meta.get("config") or {})
        now = _flat(config or {})
        changed = sorted(k for k in now if saved.get(k) != now[k])
        raise UserError(
            f"{self.directory / str(step)} was saved by a run whose state has another shape "
            f"({', '.join(changed[:6]) or 'settings'} differ): rerun with its settings, or use a "
            "new output directory"
        )

    def _set_aside(self, step: int, error: Exception) -> None:
        bad = self.directory.parent / "checkpoints.unreadable" / f"{step}-{int(time.time())}"
        first = (str(error).splitlines() or [""])[0][:200]
        log.warning(
            "checkpoint %d unreadable (%s: %s); moved to %s, trying the previous one",
            step, type(error).__name__, first, bad,
        )  # fmt: skip
        if jax.process_index() == 0:
            bad.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), bad)
        self._mngr.reload()

    def wait(self) -> None:
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            self._abandon()
            raise SaveFailed(f"{self.directory}: saving a checkpoint failed ({_why(e)})") from None

    def _abandon(self) -> None:
        """After a failed save (already reported): end Orbax's background threads and their event
        loop now; the writes still in flight cannot be stopped: their late errors are dropped
        (`ignore_orphaned_writes`, installed when this was made)."""
        with contextlib.suppress(Exception):
            self._mngr.close()

    def close(self) -> None:
        self.wait()
        self._mngr.close()


class SaveFailed(UserError):
    """A checkpoint could not be written (a full disk, a lost mount); the ones before stay."""


def _why(e: BaseException) -> str:
    """The root cause of an error raised through Orbax's layers: an OSError's reason if any."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        code = re.search(r"os_error_code='?(\d+)", str(seen))  # TensorStore's wording
        if code:
            return os.strerror(int(code.group(1)))
        seen = seen.__cause__ or seen.__context__
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def restore_workdir_params(
    workdir: Path, cfg: ModelConfig, mesh: Mesh | None, rules: Rules
) -> tuple[GPTNeo, int]:
    """Parameters of the newest readable checkpoint of a training workdir (older ones are tried,
    with a warning, past a torn one; nothing is moved: this only reads)."""
    ckpt = Checkpoints(workdir / "checkpoints", trees=("params",), async_save=False, create=False)
    steps = sorted(ckpt.steps(), reverse=True)
    if not steps:
        raise UserError(f"{workdir}: no checkpoints yet under {workdir / 'checkpoints'}")
    graphdef, state, target = abstract_params(cfg, mesh, rules)
    for s in steps:
        try:
            return merge_params(graphdef, state, ckpt.read(s, {"params": target})["params"]), s
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
    kind = model_kind(d)
    if kind == "workdir":
        cfg, meta = read_meta(d)
        model, step = restore_workdir_params(d, cfg, mesh, rules)
        info = ModelInfo("workdir", str(d), meta.get("tokenizer"), step)
        return model, dataclasses.replace(info, tokenizer_sha256=meta.get("tokenizer_sha256"))
    if kind == "model":
        _, meta = read_meta(d)
        info = ModelInfo("model", str(d), meta.get("tokenizer"), None, meta.get("hf_token_ids"),
                         meta.get("tokenizer_sha256"))  # fmt: skip
        return _load_model_dir(d, mesh, rules), info
    model = hf.load_hf(d)
    if mesh is not None:
        from jaxlm.model import shard_model

        model = shard_model(model, mesh, rules)
    tok = str(d / "jaxlm_tokenizer") if (d / "jaxlm_tokenizer").is_dir() else None
    return model, ModelInfo("hf", str(d), tok, None, hf.token_ids(d))


def model_kind(d: Path) -> str:
    """The kind ("workdir", "model" or "hf") of a directory `load_model` reads; else one line
    saying what such a directory holds."""
    if not d.exists():
        raise UserError(f"{d}: no such checkpoint directory")
    if not d.is_dir():
        raise UserError(f"{d}: a file, not a model directory")
    if (d / META).is_file() and (d / "checkpoints").is_dir():
        return "workdir"
    if (d / META).is_file() and (d / "params").is_dir():
        return "model"
    if hf.is_hf_dir(d):
        return "hf"
    if (d / "config.json").is_file():  # a damaged or other Hugging Face config: say which
        hf.config_from_hf(hf.read_config(d), where=str(d / "config.json"))
    raise UserError(
        f"{d}: not a jaxlm model directory ({META} + params/), a training workdir "
        f"({META} + checkpoints/), or a Hugging Face GPT-Neo directory (config.json)"
    )


def model_identity(path: str | Path) -> dict:
    """What identifies a model for the outputs made from it (exports, completions, samples, SAE
    analyses), read without loading its weights: its path, kind, architecture, the tokenizer it
    records (by content hash) and, for a training workdir, its newest step; for a model or a
    Hugging Face directory, a fingerprint of its weight files."""
    from jaxlm.outputs import file_fingerprint, tree_fingerprint

    d = Path(path).resolve()
    kind = model_kind(d)
    if kind == "hf":
        files = [d / "config.json", *sorted(d.glob("*.safetensors")), d / "pytorch_model.bin"]
        return {"path": str(d), "source": "hf",
                "files": [file_fingerprint(f) for f in files if f.is_file()]}  # fmt: skip
    cfg, meta = read_meta(d)
    out = {"path": str(d), "source": kind, "architecture": cfg.to_dict(),
           "tokenizer_sha256": meta.get("tokenizer_sha256")}  # fmt: skip
    if kind == "workdir":
        steps = [int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit()]
        return out | {"step": max(steps, default=None)}
    return out | {"params": tree_fingerprint(d / "params")}
