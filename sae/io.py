"""Trained SAEs on disk in SAELens 6.54.12's layout, so `sae_lens.SAE.load_from_disk` reads them.

A directory holds `cfg.json` (SAELens's inference config: d_in, d_sae, architecture, dtype,
apply_b_dec_to_input, normalize_activations, ..., `metadata` with hook_name) plus a `jaxlm` block
naming the source model and layer; `sae_weights.safetensors` (W_enc [F, S], W_dec [S, F], b_enc [S],
b_dec [F], and threshold [S] for jumprelu); and, after training, `sparsity.safetensors` (log10
firing frequency per latent, as SAELens's checkpoints carry). Weights are written as SAELens's
`save_inference_model` writes them: a topk SAE with its decoder norms folded in, a batchtopk SAE
as a jumprelu SAE whose threshold is the running one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.errors import UserError
from sae.base import SAE, SAEConfig
from sae.registry import create

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


def load_sae(path: str | Path) -> tuple[SAE, SAEInfo]:
    """An SAE directory written by `save_sae` or by SAELens (standard, topk or jumprelu)."""
    from safetensors.numpy import load_file

    d = Path(path)
    try:
        cfg = json.loads((d / CFG).read_text())
        tensors = load_file(str(d / WEIGHTS))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{d}: not a saved SAE ({CFG} + {WEIGHTS}): {e}") from None
    arch = cfg.get("architecture", "standard")
    if arch not in ("standard", "topk", "jumprelu"):
        raise UserError(f"{d / CFG}: architecture {arch!r} is not one jaxlm can load")
    known = {**cfg.get("jaxlm", {}).get("sae_config", {}), **cfg}
    fields = {k: v for k, v in known.items() if k in _FIELDS and k != "d_sae"}
    sae_cfg = SAEConfig(**{**fields, "architecture": arch, "d_sae": cfg["d_sae"]})
    sae = create(sae_cfg)
    sae.load_tensors({k: np.asarray(v, np.float32) for k, v in tensors.items()})
    meta, jx = cfg.get("metadata") or {}, cfg.get("jaxlm") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name")
    layer = jx.get("layer")
    if layer is None and hook and hook.startswith("blocks.") and hook.endswith(".mlp.hook_post"):
        layer = int(hook.split(".")[1])
    info = SAEInfo(str(d), hook, jx.get("model_path") or meta.get("model_name"), layer, cfg)
    return sae, info
