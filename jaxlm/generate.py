"""Batched sampling with a KV cache, compiled once per shape: greedy, temperature, top-k, top-p.

Prompts of different lengths are left-padded into one batch. Padding only shifts sequence slots,
and GPT-Neo's local window is a difference of slots, so every real token sees exactly the keys it
would see unpadded; positions come from the padding mask (as transformers' generate does). The
prompt length is rounded up to a multiple of 64 so that most calls reuse a compiled program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.errors import UserError
from jaxlm.model import GPTNeo, KVCache, LayerEdits, MLPEdit


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token (applied in transformers' order: temperature, top-k, top-p)."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self) -> None:
        if not self.greedy and self.temperature <= 0:
            raise UserError(f"temperature={self.temperature} must be > 0 (or use greedy)")
        if self.top_k < 0:
            raise UserError(f"top_k={self.top_k} must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p={self.top_p} must be in (0, 1]")


def sample_logits(logits_bv: jax.Array, key: jax.Array, s: SamplingConfig) -> jax.Array:
    """One token per row from float32 logits [B, V]."""
    if s.greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv / s.temperature
    neg = jnp.finfo(logits_bv.dtype).min
    if s.top_k:
        kth_b1 = jax.lax.top_k(logits_bv, min(s.top_k, logits_bv.shape[-1]))[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth_b1, neg, logits_bv)
    if s.top_p < 1.0:
        order_bv = jnp.argsort(-logits_bv, axis=-1)
        sorted_bv = jnp.take_along_axis(logits_bv, order_bv, axis=-1)
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv  # mass strictly above this token
        drop_sorted = before_bv >= s.top_p  # the top token always stays
        drop_bv = (
            jnp.zeros_like(drop_sorted)
            .at[jnp.arange(logits_bv.shape[0])[:, None], order_bv]
            .set(drop_sorted)
        )
        logits_bv = jnp.where(drop_bv, neg, logits_bv)
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


@nnx.jit(static_argnames=("max_new_tokens", "sampling"))
def _generate(
    model, edit, tokens_bp, valid_bp, key, eos_id, *, max_new_tokens: int,
    sampling: SamplingConfig,
):  # fmt: skip
    B, P = tokens_bp.shape
    positions_bp = jnp.maximum(jnp.cumsum(valid_bp, axis=-1) - 1, 0).astype(jnp.int32)
    cache = KVCache.init(model.cfg, B, P + max_new_tokens)
    logits_bpv, cache = model.decode(
        tokens_bp, cache, positions_bt=positions_bp, valid_bt=valid_bp, edit=edit
    )
    next_pos_b = positions_bp[:, -1] + 1
    out_bn = jnp.zeros((B, max_new_tokens), jnp.int32)

    def cond(carry):
        i, _, _, done_b, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done_b)

    def body(carry):
        i, logits_bv, cache, done_b, pos_b, out_bn, key = carry
        key, sub = jax.random.split(key)
        tok_b = sample_logits(logits_bv, sub, sampling)
        tok_b = jnp.where(done_b, eos_id, tok_b)
        out_bn = out_bn.at[:, i].set(tok_b)
        done_b = done_b | (tok_b == eos_id)
        logits_b1v, cache = model.decode(
            tok_b[:, None], cache, positions_bt=pos_b[:, None], edit=edit
        )
        return i + 1, logits_b1v[:, -1], cache, done_b, pos_b + 1, out_bn, key

    init = (jnp.int32(0), logits_bpv[:, -1], cache, jnp.zeros((B,), bool), next_pos_b, out_bn, key)
    n, *_, out_bn, _ = jax.lax.while_loop(cond, body, init)
    return out_bn, n


def generate(
    model: GPTNeo,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    sampling: SamplingConfig = SamplingConfig(greedy=True),
    seed: int = 0,
    eos_id: int | None = None,
    pad_id: int = 0,
    bucket: int = 64,
    edit: MLPEdit | LayerEdits | None = None,
) -> list[list[int]]:
    """New tokens for each prompt, stopping after `eos_id` (which is kept, as transformers does).

    `edit` changes one layer's MLP hidden state at every step (e.g. SAE features ablated), a
    `LayerEdits` several layers'; it is an `nnx.Module` so that its arrays are traced, not baked
    into the compiled program."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 1")
    longest = max(len(p) for p in prompts)
    P = -(-longest // bucket) * bucket if bucket else longest
    if longest + max_new_tokens > model.cfg.max_positions:
        raise UserError(
            f"prompt of {longest} tokens + {max_new_tokens} new ones exceeds the model's "
            f"{model.cfg.max_positions} positions; shorten the prompt or --max-new-tokens"
        )
    vocab = model.cfg.vocab_size
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    valid = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):
        if min(p) < 0 or max(p) >= vocab:
            raise UserError(f"prompt {i}: token ids must be in [0, {vocab})")
        tokens[i, P - len(p) :] = p
        valid[i, P - len(p) :] = True
    eos = -1 if eos_id is None else eos_id
    out, n = _generate(
        model,
        edit,
        jnp.asarray(tokens),
        jnp.asarray(valid),
        jax.random.key(seed),
        jnp.int32(eos),
        max_new_tokens=max_new_tokens,
        sampling=sampling,
    )
    out = np.asarray(out)[:, : int(n)]
    result = []
    for row in out.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        result.append(row)
    return result
