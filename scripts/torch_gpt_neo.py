"""A hand-written GPT-Neo in PyTorch, the fast peer of scripts/bench_train.py.

Why: transformers' GPTNeoForCausalLM is the reference for semantics, but not for speed (it
materialises every attention matrix in float32). Issue 4 states jaxlm's GPU goal next to "a
hand-written PyTorch GPT with flash attention"; this is that peer, with GPT-Neo's exact semantics
so the comparison is like for like: unscaled attention scores, "local" layers that see the last
`window_size` slots, tanh GELU ("gelu_new"), tied embeddings. Attention is
`F.scaled_dot_product_attention`: flash for the causal "global" layers, a band mask (memory-
efficient kernel) for the local ones; flash for those too when the window spans the sequence,
where the band is the causal mask (bench_train.py's `torch-gpt[window_size=512]`). It shares the
parameter tensors of the transformers model it is built from, so its logits are checked against
that model's (tests/test_bench_train.py).

Dimension alphabet as in jaxlm/model.py: B batch, T time, D d_model, N heads, H head dim, F mlp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TorchGPTNeo(nn.Module):
    """GPT-Neo's forward pass (no cache, no padding) over `hf`'s own parameters."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        cfg = hf.config
        self.hf = hf  # the parameters live here; state_dict and optimizers see the same tensors
        self.n_heads = cfg.num_heads
        self.window = cfg.window_size
        self.eps = cfg.layer_norm_epsilon
        self.kinds = list(cfg.attention_layers)
        if cfg.activation_function != "gelu_new":
            raise ValueError(f"activation {cfg.activation_function!r}: only gelu_new is written")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]."""
        tr = self.hf.transformer
        B, T = input_ids.shape
        pos_t = torch.arange(T, device=input_ids.device)
        x_btd = tr.wte(input_ids) + tr.wpe(pos_t)
        band_tt = None
        if "local" in self.kinds and T > self.window:  # query i sees keys i - window + 1 .. i
            d_tt = pos_t[:, None] - pos_t[None, :]
            band_tt = (d_tt >= 0) & (d_tt < self.window)
        for kind, block in zip(self.kinds, tr.h, strict=True):
            a = block.attn.attention
            h_btd = block.ln_1(x_btd)
            q, k, v = (
                proj(h_btd).view(B, T, self.n_heads, -1).transpose(1, 2)  # [B, N, T, H]
                for proj in (a.q_proj, a.k_proj, a.v_proj)
            )
            if band_tt is None or kind == "global":
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=band_tt, scale=1.0)
            x_btd = x_btd + a.out_proj(o.transpose(1, 2).reshape(B, T, -1))
            m = block.mlp
            h_btf = F.gelu(m.c_fc(block.ln_2(x_btd)), approximate="tanh")
            x_btd = x_btd + m.c_proj(h_btf)
        return self.hf.lm_head(tr.ln_f(x_btd))
