"""Hugging Face interop: GPT-Neo `config.json` + `model.safetensors` in and out.

The writer needs neither torch nor transformers, so a TPU VM can export; the reader takes any
GPT-Neo checkpoint (safetensors, or a PyTorch .bin when torch is installed), e.g. a published
TinyStories model, so training can start from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.errors import UserError
from jaxlm.model import GPTNeo


def hf_config(
    cfg: ModelConfig,
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> dict[str, Any]:
    """transformers' GPTNeoConfig as a dict, with dropout off as in the TinyStories models."""
    d = {
        "architectures": ["GPTNeoForCausalLM"],
        "model_type": "gpt_neo",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_positions,
        "hidden_size": cfg.d_model,
        "num_layers": cfg.n_layers,
        "attention_types": [[list(cfg.attention_layers), 1]],
        "attention_layers": list(cfg.attention_layers),
        "num_heads": cfg.n_heads,
        "intermediate_size": cfg.d_mlp,
        "window_size": cfg.window_size,
        "activation_function": cfg.activation,
        "resid_dropout": 0.0,
        "embed_dropout": 0.0,
        "attention_dropout": 0.0,
        "classifier_dropout": 0.1,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    # Always written, null when unknown: left out, transformers would fill in GPT-2's 50256.
    d.update(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    return d


def token_ids(hf_dir: str | Path) -> dict[str, int | None]:
    """The bos/eos/pad ids of a Hugging Face config.json, as save_hf's keywords."""
    d = read_config(hf_dir)
    return {f"{k}_id": d.get(f"{k}_token_id") for k in ("bos", "eos", "pad")}


def read_config(hf_dir: str | Path) -> dict[str, Any]:
    """A Hugging Face directory's config.json as a dict; one line when it is unreadable."""
    p = Path(hf_dir) / "config.json"
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: cannot read ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{p}: expected a JSON object, got {type(d).__name__}")
    return d


def config_from_hf(d: dict[str, Any], *, where: str = "config.json") -> ModelConfig:
    try:
        return _config_from_hf(d, where)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        what = f"no {e}" if isinstance(e, KeyError) else str(e)
        raise UserError(f"{where}: not a GPT-Neo config ({what})") from None


def _config_from_hf(d: dict[str, Any], where: str) -> ModelConfig:
    if d.get("model_type") != "gpt_neo":
        raise UserError(f"{where}: model_type is {d.get('model_type')!r}, expected 'gpt_neo'")
    if "attention_types" in d:
        layers = [k for pattern, rep in d["attention_types"] for _ in range(rep) for k in pattern]
    else:
        layers = d["attention_layers"]
    act = d.get("activation_function", "gelu_new")
    if act != "gelu_new":
        raise UserError(f"{where}: activation_function {act!r} is not supported (gelu_new only)")
    return ModelConfig(
        vocab_size=d["vocab_size"],
        d_model=d["hidden_size"],
        n_layers=d["num_layers"],
        n_heads=d["num_heads"],
        d_mlp=d.get("intermediate_size"),
        max_positions=d["max_position_embeddings"],
        window_size=d.get("window_size", 256),
        attention_layers=tuple(layers),
        layer_norm_eps=d.get("layer_norm_epsilon", 1e-5),
        init_std=d.get("initializer_range", 0.02),
    )


def to_hf_tensors(model: GPTNeo) -> dict[str, np.ndarray]:
    """transformers' state dict (tied lm_head left out, as save_pretrained does)."""
    cfg = model.cfg
    D = cfg.d_model
    g = lambda p: np.asarray(p[...], dtype=np.float32)  # noqa: E731
    out = {
        "transformer.wte.weight": g(model.wte_vd),
        "transformer.wpe.weight": g(model.wpe_pd),
        "transformer.ln_f.weight": g(model.ln_f.scale_d),
        "transformer.ln_f.bias": g(model.ln_f.bias_d),
    }
    for i, b in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        a = b.attn
        out[p + "ln_1.weight"], out[p + "ln_1.bias"] = g(b.ln_1.scale_d), g(b.ln_1.bias_d)
        out[p + "ln_2.weight"], out[p + "ln_2.bias"] = g(b.ln_2.scale_d), g(b.ln_2.bias_d)
        for name, w in (("q", a.w_q_dnh), ("k", a.w_k_dnh), ("v", a.w_v_dnh)):
            out[p + f"attn.attention.{name}_proj.weight"] = g(w).reshape(D, D).T  # torch: [out, in]
        out[p + "attn.attention.out_proj.weight"] = g(a.w_o_nhd).reshape(D, D).T
        out[p + "attn.attention.out_proj.bias"] = g(a.b_o_d)
        out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = g(b.mlp.w_up_df).T, g(b.mlp.b_up_f)
        out[p + "mlp.c_proj.weight"] = g(b.mlp.w_down_fd).T
        out[p + "mlp.c_proj.bias"] = g(b.mlp.b_down_d)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_hf_tensors(
    cfg: ModelConfig, t: dict[str, np.ndarray], *, where: str = "checkpoint"
) -> GPTNeo:
    """Build a jaxlm model from a transformers GPT-Neo state dict."""
    t = {k.removeprefix("model."): v for k, v in t.items()}
    if not any(k.startswith("transformer.") for k in t):
        t = {"transformer." + k: v for k, v in t.items()}  # a bare GPTNeoModel state dict
    D, N, H = cfg.d_model, cfg.n_heads, cfg.head_dim

    def get(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in t:
            raise UserError(f"{where}: tensor {key!r} is missing")
        v = np.asarray(t[key], dtype=np.float32)
        if v.shape != shape:
            raise UserError(f"{where}: tensor {key!r} has shape {v.shape}, config says {shape}")
        return v

    model = nnx.eval_shape(lambda: GPTNeo(cfg, rngs=nnx.Rngs(0)))
    F, V, P = cfg.d_ff, cfg.vocab_size, cfg.max_positions
    vals: dict[tuple[str | int, ...], np.ndarray] = {
        ("wte_vd",): get("transformer.wte.weight", (V, D)),
        ("wpe_pd",): get("transformer.wpe.weight", (P, D)),
        ("ln_f", "scale_d"): get("transformer.ln_f.weight", (D,)),
        ("ln_f", "bias_d"): get("transformer.ln_f.bias", (D,)),
    }
    for i in range(cfg.n_layers):
        p = f"transformer.h.{i}."
        b: tuple[str | int, ...] = ("blocks", i)
        vals[b + ("ln_1", "scale_d")] = get(p + "ln_1.weight", (D,))
        vals[b + ("ln_1", "bias_d")] = get(p + "ln_1.bias", (D,))
        vals[b + ("ln_2", "scale_d")] = get(p + "ln_2.weight", (D,))
        vals[b + ("ln_2", "bias_d")] = get(p + "ln_2.bias", (D,))
        for name in "qkv":
            w = get(p + f"attn.attention.{name}_proj.weight", (D, D))
            vals[b + ("attn", f"w_{name}_dnh")] = w.T.reshape(D, N, H)
        vals[b + ("attn", "w_o_nhd")] = get(p + "attn.attention.out_proj.weight", (D, D)).T.reshape(
            N, H, D
        )
        vals[b + ("attn", "b_o_d")] = get(p + "attn.attention.out_proj.bias", (D,))
        vals[b + ("mlp", "w_up_df")] = get(p + "mlp.c_fc.weight", (F, D)).T
        vals[b + ("mlp", "b_up_f")] = get(p + "mlp.c_fc.bias", (F,))
        vals[b + ("mlp", "w_down_fd")] = get(p + "mlp.c_proj.weight", (D, F)).T
        vals[b + ("mlp", "b_down_d")] = get(p + "mlp.c_proj.bias", (D,))
    if "lm_head.weight" in t and not np.array_equal(
        t["lm_head.weight"], t["transformer.wte.weight"]
    ):
        raise UserError(f"{where}: lm_head.weight differs from wte; jaxlm needs tied embeddings")

    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        key = tuple(int(k) if isinstance(k, int) else str(k) for k in path)
        if key not in vals:
            raise UserError(f"{where}: no tensor for parameter {'/'.join(map(str, key))}")
        var.set_value(np.ascontiguousarray(vals[key]))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_hf(model: GPTNeo, out_dir: str | Path, **ids: int | None) -> Path:
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(model.cfg, **ids), indent=2) + "\n")
    save_file(to_hf_tensors(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "generation_config.json").write_text(
        json.dumps(
            {k.replace("_id", "_token_id"): v for k, v in ids.items() if v is not None}, indent=2
        )
        + "\n"
    )
    return out


def is_hf_dir(path: str | Path) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("model_type") == "gpt_neo"
    except (OSError, json.JSONDecodeError):
        return False


def load_hf(hf_dir: str | Path) -> GPTNeo:
    """Any GPT-Neo checkpoint directory written by transformers' save_pretrained."""
    d = Path(hf_dir)
    cfg = config_from_hf(read_config(d), where=str(d / "config.json"))
    tensors: dict[str, np.ndarray] = {}
    shards = sorted(d.glob("*.safetensors"))
    if shards:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        for f in shards:
            try:
                tensors.update(load_file(str(f)))
            except (SafetensorError, OSError) as e:  # truncated or not safetensors at all
                msg = (str(e).splitlines() or [type(e).__name__])[0]
                raise UserError(f"{f}: cannot read ({msg})") from None
    elif (d / "pytorch_model.bin").is_file():
        try:
            import torch
        except ImportError:
            raise UserError(f"{d}/pytorch_model.bin needs torch: pip install 'jaxlm[hf]'") from None
        sd = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
        tensors = {k: v.float().numpy() for k, v in sd.items()}
    else:
        raise UserError(f"{d}: no model.safetensors or pytorch_model.bin")
    return from_hf_tensors(cfg, tensors, where=str(d))
