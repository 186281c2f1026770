"""Small things tests and benchmarks make for themselves: random transformers GPT-Neo models.

Library code may use this module; it never imports tests/.
"""

from __future__ import annotations

from pathlib import Path

from jaxlm.config import ModelConfig
from jaxlm.hf import hf_config


def random_hf_gpt_neo(
    cfg: ModelConfig, out_dir: str | Path | None = None, seed: int = 0, eos_id: int | None = None
):
    """A randomly initialised transformers GPTNeoForCausalLM (fp32, eval mode) with cfg's shape.

    transformers initialises every bias to 0 and every LayerNorm scale to 1, so a loader that
    dropped them would still match it: here they are random too (scales around 1)."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(seed)
    d = hf_config(cfg)
    d.pop("architectures"), d.pop("model_type"), d.pop("attention_layers"), d.pop("torch_dtype")
    d["bos_token_id"] = d["eos_token_id"] = eos_id
    model = GPTNeoForCausalLM(GPTNeoConfig(**d)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.02)
            elif ".ln_" in name and name.endswith(".weight"):
                p.normal_(1.0, 0.1)
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model
