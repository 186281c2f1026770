"""Trained SAEs on disk in SAELens 6.54.12's layout, so `sae_lens.SAE.load_from_disk` reads them.

A directory holds `cfg.json` (SAELens's inference config: d_in, d_sae, architecture, dtype,
apply_b_dec_to_input, normalize_activations, ..., `metadata` with hook_name) plus a `jaxlm` block
naming the source model and layer; `sae_weights.safetensors` (W_enc [F, S], W_dec [S, F], b_enc [S],
b_dec [F], and threshold [S] for jumprelu); and, after training, `sparsity.safetensors` (log10
firing frequency per latent, as SAELens's checkpoints carry). Weights are written as SAELens's
`save_inference_model` writes them: a topk SAE with its decoder norms folded in, a batchtopk SAE
as a jumprelu SAE whose threshold is the running one.

`load_sae` is the one loader: training's saves, SAELens's, and every consumer (TSEA, the
dashboards, the analysis CLI) read SAEs through it, as the registered class of the architecture
the directory names (`sae.registry`), so a new variant is loaded, encoded and decoded by its own
code everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.errors import UserError
from sae.base import SAE, SAEConfig
from sae.registry import create, get, names

SAE_LENS_VERSION = "6.54.12"  # the layout written here
CFG, WEIGHTS, SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
_FIELDS = {f.name for f in dataclasses.fields(SAEConfig)}


@dataclasses.dataclass(frozen=True)
class SAEInfo:
    """Where a saved SAE reads its activations from."""

    path: str
    hook_name: str | None  # TransformerLens name, e.g. blocks.3.mlp.hook_post
    model_path: str | None  # the jaxlm model (dir, workdir or HF dir) it was trained on
    layer: int | None
    cfg: dict[str, Any]  # the whole cfg.json


def hook_name(layer: int) -> str:
    """TransformerLens' name for the MLP hidden state after the activation, i.e. what we read."""
    return f"blocks.{layer}.mlp.hook_post"


def save_sae(
    path: str | Path,
    sae: SAE,
    *,
    layer: int | None = None,
    model_path: str | None = None,
    context_size: int | None = None,
    log_sparsity_s: np.ndarray | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `sae` for inference: cfg.json + sae_weights.safetensors (+ sparsity.safetensors)."""
    from safetensors.numpy import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    arch, tensors = sae.inference_tensors()
    get(arch)  # saved under a name load_sae can find, or not at all
    c = sae.cfg
    training = {k: v for k, v in dataclasses.asdict(c).items() if k not in ("d_in", "d_sae")}
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": c.d_in,
        "d_sae": c.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": c.normalize_activations,
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAE_LENS_VERSION,
            "sae_lens_training_version": SAE_LENS_VERSION,
            "model_name": model_path,
            "hook_name": hook_name(layer) if layer is not None else None,
            "hook_head_index": None,
            "context_size": context_size,
            "prepend_bos": False,  # jaxlm rows start mid-stream, stories separated by EOS
            "training_architecture": c.architecture,
            "training_architecture_details": training,
        },
        "jaxlm": {
            "model_path": model_path,
            "layer": layer,
            "sae_config": training,
            **(extra or {}),
        },
    }
    if arch == "topk":
        cfg.update(k=int(c.k), rescale_acts_by_decoder_norm=c.rescale_acts_by_decoder_norm)
    save_file({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()},
              str(out / WEIGHTS))  # fmt: skip
    if log_sparsity_s is not None:
        save_file({"sparsity": np.asarray(log_sparsity_s, np.float32)}, str(out / SPARSITY))
    (out / CFG).write_text(json.dumps(cfg, indent=2) + "\n")  # last: its presence means complete
    return out


def mlp_layer(cfg: dict[str, Any], where: str | Path = CFG) -> int | None:
    """The model layer whose MLP post-activation (`blocks.N.mlp.hook_post`) an SAE reads.

    From `jaxlm.layer` (our saves), `hook_layer` (SAELens 4.x), or N in the hook name (top level
    as in SAELens 4.x, under `metadata` as in 6.x); None when the cfg names none. An SAE on another
    hook of a block is refused: jaxlm feeds SAEs the MLP post-activation only, and `hook_pre`
    has the same width, so an SAE trained on it would read the post-activation silently wrong.
    """
    hook = str((cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name") or "")
    block = re.search(r"(?:blocks|h|layers)\.(\d+)\.", hook)
    if block and not re.search(r"\.mlp\.(?:hook_post|act)$", hook):
        raise UserError(f"{where}: the SAE reads {hook}; jaxlm feeds SAEs the MLP's "
                        "post-activation (blocks.N.mlp.hook_post)")  # fmt: skip
    for layer in ((cfg.get("jaxlm") or {}).get("layer"), cfg.get("hook_layer")):
        if isinstance(layer, int) and not isinstance(layer, bool):
            return layer
    return int(block.group(1)) if block else None


def load_sae(path: str | Path) -> tuple[SAE, SAEInfo]:
    """The SAE saved in a directory, as the registered class of the architecture it names.

    Reads `save_sae`'s directories (any registered architecture, with its training config),
    SAELens 6.x (standard; topk with a top-level `k`; jumprelu with a `threshold` tensor) and
    SAELens 4.x (`activation_fn_str: topk` with `activation_fn_kwargs.k`, `hook_layer`). A field
    a cfg.json leaves out takes SAELens's inference default (so a topk SAE without
    `rescale_acts_by_decoder_norm` does not rescale). A problem is one UserError naming the file.
    """
    d = Path(path)
    cfg = read_cfg(d / CFG)
    tensors = _read_weights(d / WEIGHTS)
    sae = create(_sae_config(cfg, d / CFG))
    _check_tensors(sae, tensors, d / WEIGHTS)
    sae.load_tensors({k: np.asarray(v, np.float32) for k, v in tensors.items()})
    meta, jx = cfg.get("metadata") or {}, cfg.get("jaxlm") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name")
    model_path = jx.get("model_path") or meta.get("model_name")
    return sae, SAEInfo(str(d), hook, model_path, mlp_layer(cfg, d / CFG), cfg)


def read_cfg(path: Path) -> dict[str, Any]:
    """An SAE directory's cfg.json as a dict, or one line naming it."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise UserError(f"{path}: missing (an SAE directory holds {CFG} + that file)")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise UserError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None


def architecture_of(cfg: dict[str, Any], where: Path) -> str:
    """The registry name of a cfg.json's SAE (SAELens 4.x wrote topk as "standard" + topk)."""
    arch = cfg.get("architecture") or "standard"
    act = cfg.get("activation_fn_str")  # SAELens 4.x: a topk SAE has architecture "standard"
    if act not in (None, "relu", "topk"):
        raise UserError(f"{where}: activation_fn_str={act!r}; jaxlm reads relu and topk")
    if act == "topk":
        arch = "topk"
    if arch not in names():
        raise UserError(f"{where}: architecture {arch!r}; known ones are {', '.join(names())}")
    return arch


def _sae_config(cfg: dict[str, Any], where: Path) -> SAEConfig:
    """SAEConfig from a cfg.json: its top-level fields over our saved training config."""
    arch = architecture_of(cfg, where)
    trained = (cfg.get("jaxlm") or {}).get("sae_config") or {}
    fields = {k: v for k, v in {**trained, **cfg}.items() if k in _FIELDS}
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (d_in, d_sae)):
        raise UserError(f"{where}: d_in={d_in!r}, d_sae={d_sae!r}: need two positive integers")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise UserError(f"{where}: normalize_activations={norm!r} is not one jaxlm can apply")
    fields.update(architecture=arch, d_in=d_in, d_sae=d_sae, normalize_activations=norm)
    if arch == "topk":
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise UserError(f"{where}: a topk SAE needs an integer k >= 1 (got {k!r})")
        rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False))  # SAELens's default
        fields.update(k=k, rescale_acts_by_decoder_norm=rescale)
    try:
        return SAEConfig(**fields)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _check_tensors(sae: SAE, tensors: dict[str, np.ndarray], where: Path) -> None:
    """Every tensor the architecture saves is there, in the shape cfg.json's d_in, d_sae give."""
    saved_as, want = sae.inference_tensors()
    if saved_as != sae.architecture:  # e.g. batchtopk, which saves as jumprelu
        raise UserError(f"{where.parent / CFG}: a {sae.architecture} SAE is saved as {saved_as}")
    for name, v in want.items():
        if name not in tensors:
            raise UserError(f"{where}: tensor {name!r} is missing")
        if tuple(tensors[name].shape) != tuple(v.shape):
            raise UserError(
                f"{where}: {name} has shape {tuple(tensors[name].shape)}; d_in={sae.cfg.d_in}, "
                f"d_sae={sae.cfg.n_latents} in {CFG} make it {tuple(v.shape)}"
            )
