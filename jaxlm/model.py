"""GPT-Neo in Flax NNX, with exactly the semantics of transformers' GPTNeoForCausalLM.

Dimension alphabet (used in einsum strings, weight names and shape comments):
    B batch · T time (query positions) · S key positions (the KV cache) · D model
    N heads · H head dim (D / N) · F MLP hidden (4 D) · V vocabulary · P learned positions

GPT-Neo's quirks, all kept on purpose because the TinyStories checkpoints depend on them:
  * attention scores are NOT scaled by 1/sqrt(H);
  * a "local" layer lets a query at slot i see keys at slots i-255 .. i (window 256), counted in
    sequence slots (left padding included), as transformers' sliding mask does;
  * q/k/v projections have no bias, the output projection has one;
  * scores and softmax run in float32 whatever the compute dtype;
  * input and output embeddings are tied; the activation is gelu_new (tanh approximation).

Parameters are float32 master weights; `cfg.dtype` is the compute dtype (bfloat16 on accelerators).
In bfloat16 the residual stream is bfloat16 too by default: half the activation bytes. With
`residual_float32` it stays float32 as under torch autocast (the PyTorch peers' numerics): the
embeddings' sum and every residual add in float32, LayerNorm's output rounded to the compute dtype
for the next matmul. LayerNorm, attention scores and the softmax are float32 either way.
Every parameter names its logical axes in `out_sharding`; jaxlm/sharding.yaml maps them to the
(data, fsdp, tensor) mesh. Dropout is absent: the TinyStories models were trained without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxlm.config import ModelConfig
from jaxlm.sharding import DEFAULT_RULES, Rules, constrain, param_shardings

Array = jax.Array


# Parameters carry logical names but are not sharded as they are made (eager_sharding=False): the
# same constructor then works with no mesh at all, and `init_model` places them in one jit.
def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _const(shape: tuple[int, ...], axes: tuple[str, ...], value: float) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, jnp.float32), out_sharding=axes, eager_sharding=False)


class KVCache(NamedTuple):
    """Every layer's keys and values for S slots, which slots hold real tokens, the next slot."""

    k_lbsnh: Array  # [L, B, S, N, H]
    v_lbsnh: Array  # [L, B, S, N, H]
    valid_bs: Array  # [B, S] bool: slot written with a real (non-pad) token
    next_slot: Array  # [] int32: first free slot (not `index`, which would shadow tuple.index)

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, length: int) -> KVCache:
        shape = (cfg.n_layers, batch, length, cfg.n_heads, cfg.head_dim)
        dt = jnp.dtype(cfg.dtype)
        return cls(
            jnp.zeros(shape, dt),
            jnp.zeros(shape, dt),
            jnp.zeros((batch, length), bool),
            jnp.int32(0),
        )


class MLPEdit(Protocol):
    """Changes layer `layer`'s MLP hidden state [B, T, F] (after the activation) before the
    output projection: an SAE's reconstruction spliced in, or chosen features ablated."""

    layer: int

    def __call__(self, h_btf: Array) -> Array: ...


class LayerEdits(nnx.Module):
    """Several MLPEdits at distinct layers, applied in one forward pass (each where its own
    `layer` says), taken wherever one `edit` is: a behaviour spread over several layers' MLPs
    can only be removed by editing all of them at once, each downstream layer then seeing the
    upstream edits' effect.

    An nnx.Module holding its edits in an `nnx.List`, so that the edits' arrays travel through
    nnx.split / merge (and `generate`'s jit) as one edit's do."""

    def __init__(self, edits: Iterable[MLPEdit]):
        edits = sorted(edits, key=lambda e: e.layer)
        layers = [e.layer for e in edits]
        twice = sorted({i for i in layers if layers.count(i) > 1})
        if twice:
            raise ValueError(f"more than one edit at layers {twice}: one edit per layer")
        self.edits = nnx.List(edits)

    @property
    def layers(self) -> tuple[int, ...]:
        """The edited layers, ascending."""
        return tuple(e.layer for e in self.edits)


def _edits_by_layer(edit: MLPEdit | LayerEdits | None, n_layers: int) -> dict[int, MLPEdit]:
    """{layer: its edit} of one edit or a LayerEdits, every layer checked against the model."""
    edits = [] if edit is None else list(edit.edits) if isinstance(edit, LayerEdits) else [edit]
    for e in edits:
        if not 0 <= e.layer < n_layers:
            raise ValueError(f"edit.layer={e.layer}: layers are 0..{n_layers - 1}")
    return {e.layer: e for e in edits}


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x_btd: Array, scale_d: Array, bias_d: Array, eps: float, out_dtype=None) -> Array:
    """LayerNorm over the last axis in float32 (as torch autocast runs it), returned in
    `out_dtype` (None: x's dtype).

    The backward pass is written out because XLA's own recomputed the mean and variance inside
    each backward fusion that needs them; keeping mean and 1/std ([B, T, 1] each, float32) made
    the ts-33m CPU train step about 4-7% faster. They pass an optimization barrier so that XLA
    stores them rather than fusing their reductions again into the backward's consumers: on the
    GPU it otherwise recomputed the mean inside a normalisation kernel and wrote the scale
    gradient's product x_hat * dy ([B, T, D], float32) out for a separate column sum (H200,
    ts-33m bf16, with the GPU defaults: 25.52 -> 24.62 ms per step).
    """
    return _layer_norm_fwd(x_btd, scale_d, bias_d, eps, out_dtype)[0]


def _layer_norm_fwd(x_btd, scale_d, bias_d, eps, out_dtype):
    x = x_btd.astype(jnp.float32)
    mean_bt1 = x.mean(-1, keepdims=True)
    rstd_bt1 = jax.lax.rsqrt(jnp.square(x - mean_bt1).mean(-1, keepdims=True) + eps)
    mean_bt1, rstd_bt1 = jax.lax.optimization_barrier((mean_bt1, rstd_bt1))
    y = (x - mean_bt1) * rstd_bt1 * scale_d + bias_d
    return y.astype(out_dtype or x_btd.dtype), (x_btd, mean_bt1, rstd_bt1, scale_d)


def _layer_norm_bwd(eps, out_dtype, res, dy_btd):
    x_btd, mean_bt1, rstd_bt1, scale_d = res
    xhat = (x_btd.astype(jnp.float32) - mean_bt1) * rstd_bt1
    dy = dy_btd.astype(jnp.float32)
    g = dy * scale_d  # d loss / d xhat
    dx = rstd_bt1 * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    rows = tuple(range(dy.ndim - 1))
    return dx.astype(x_btd.dtype), (dy * xhat).sum(rows), dy.sum(rows)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 (as torch autocast does), returned in the compute dtype."""

    def __init__(self, cfg: ModelConfig):
        self.eps = cfg.layer_norm_eps
        self.out_dtype = cfg.dtype
        self.scale_d = _const((cfg.d_model,), ("norm",), 1.0)
        self.bias_d = _const((cfg.d_model,), ("norm",), 0.0)

    def __call__(self, x_btd: Array) -> Array:
        return layer_norm(x_btd, self.scale_d[...], self.bias_d[...], self.eps, self.out_dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: str, rngs: nnx.Rngs):
        D, N, H, std = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.init_std
        self.cfg, self.kind = cfg, kind
        self.w_q_dnh = _param(rngs, (D, N, H), ("embed", "heads", "head_dim"), std)
        self.w_k_dnh = _param(rngs, (D, N, H), ("embed", "heads", "head_dim"), std)
        self.w_v_dnh = _param(rngs, (D, N, H), ("embed", "heads", "head_dim"), std)
        self.w_o_nhd = _param(rngs, (N, H, D), ("heads", "head_dim", "embed"), std)
        self.b_o_d = _const((D,), ("embed",), 0.0)

    @property
    def window(self) -> int | None:
        return self.cfg.window_size if self.kind == "local" else None

    def __call__(
        self,
        x_btd: Array,
        *,
        q_slot_t: Array,  # [T] slot of each query
        valid_bs: Array | None,  # [B, S] key slots holding real tokens; None: all of them
        kv: tuple[Array, Array]
        | None,  # cached ([B, S, N, H], [B, S, N, H]) after writing this step
        write: tuple[Array, int] | None = None,
    ) -> tuple[Array, tuple[Array, Array]]:
        dt = x_btd.dtype
        q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, self.w_q_dnh[...].astype(dt))
        k_btnh = jnp.einsum("btd,dnh->btnh", x_btd, self.w_k_dnh[...].astype(dt))
        v_btnh = jnp.einsum("btd,dnh->btnh", x_btd, self.w_v_dnh[...].astype(dt))
        q_btnh = constrain(q_btnh, ("batch", "length", "act_heads", None))
        if kv is None:
            k_bsnh, v_bsnh = k_btnh, v_btnh
        else:  # write this step's keys and values into the cache at slot `index`
            assert write is not None, "a cached step needs its write slot"
            index = write[0]
            k_bsnh = jax.lax.dynamic_update_slice_in_dim(
                kv[0], k_btnh.astype(kv[0].dtype), index, 1
            )
            v_bsnh = jax.lax.dynamic_update_slice_in_dim(
                kv[1], v_btnh.astype(kv[1].dtype), index, 1
            )
        plain = kv is None and valid_bs is None
        if self._use_cudnn(plain):
            out_btnh = self._cudnn(q_btnh, k_bsnh, v_bsnh)
        elif plain:
            out_btnh = self._xla_blocks(q_btnh, k_bsnh, v_bsnh)
        else:
            out_btnh = self._xla(q_btnh, k_bsnh, v_bsnh, q_slot_t, valid_bs)
        out_btd = jnp.einsum("btnh,nhd->btd", out_btnh, self.w_o_nhd[...].astype(dt))
        return out_btd + self.b_o_d[...].astype(dt), (k_bsnh, v_bsnh)

    def _use_cudnn(self, plain: bool) -> bool:
        impl = self.cfg.attention_impl
        if impl == "xla" or not plain:
            return False
        if impl == "cudnn":
            return True
        return jax.default_backend() == "gpu" and self.cfg.dtype != "float32"

    def _xla_blocks(self, q_btnh, k_btnh, v_btnh) -> Array:
        # No cache, no padding (training): query slot t is t. Each block of queries meets only the
        # keys it may see, so about half the scores of the full [T, T] square are never made.
        # Masked keys weigh exactly 0 in `_xla`, so this equals it up to float reordering.
        # Blocks of 64 measured fastest on CPU (train step 1.45x at T=512); 128 fills a TPU's MXU.
        block = 64 if jax.default_backend() == "cpu" else 128
        T, outs = q_btnh.shape[1], []
        for lo in range(0, T, block):
            hi = min(lo + block, T)
            k_lo = 0 if self.window is None else max(0, lo - self.window + 1)
            q_slot_t = jnp.arange(lo, hi)
            outs.append(
                self._xla(
                    q_btnh[:, lo:hi], k_btnh[:, k_lo:hi], v_btnh[:, k_lo:hi], q_slot_t, None, k_lo
                )
            )
        return jnp.concatenate(outs, axis=1)  # [B, T, N, H]

    def _xla(self, q_btnh, k_bsnh, v_bsnh, q_slot_t, valid_bs, k_start: int = 0) -> Array:
        # Scores in float32 and unscaled: GPT-Neo casts q, k to float32, never divides by sqrt(H).
        scores_bnts = jnp.einsum(
            "btnh,bsnh->bnts", q_btnh, k_bsnh, preferred_element_type=jnp.float32
        )
        k_slot_s = k_start + jnp.arange(k_bsnh.shape[1])
        allowed_ts = k_slot_s[None, :] <= q_slot_t[:, None]
        if self.window is not None:
            allowed_ts &= q_slot_t[:, None] - k_slot_s[None, :] < self.window
        allowed = allowed_ts[None, None]  # [1, 1, T, S]
        if valid_bs is not None:
            allowed = allowed & valid_bs[:, None, None, :]
        scores_bnts = jnp.where(allowed, scores_bnts, jnp.finfo(jnp.float32).min)
        # Softmax with the division moved after the value product, as flash attention does: it
        # then divides [B, T, N, H] instead of [B, N, T, S] (H is 16 in most presets).
        max_bnt1 = jax.lax.stop_gradient(jnp.max(scores_bnts, axis=-1, keepdims=True))
        p_bnts = jnp.exp(scores_bnts - max_bnt1)
        sum_btn = jnp.einsum("bnts->btn", p_bnts)
        out_btnh = jnp.einsum(
            "bnts,bsnh->btnh",
            p_bnts.astype(v_bsnh.dtype),
            v_bsnh,
            preferred_element_type=jnp.float32,
        )
        return (out_btnh / sum_btn[..., None]).astype(v_bsnh.dtype)

    def _cudnn(self, q_btnh, k_bsnh, v_bsnh) -> Array:
        # Fused flash attention (float32 softmax accumulators) with GPT-Neo's scale of 1. A window
        # that spans every key is the causal mask: cuDNN's plain causal kernel then.
        w = self.window
        window = None if w is None or w >= k_bsnh.shape[1] else (w - 1, 0)
        return jax.nn.dot_product_attention(
            q_btnh,
            k_bsnh,
            v_bsnh,
            scale=1.0,
            is_causal=True,
            local_window_size=window,
            implementation="cudnn",
        )


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F, std = cfg.d_model, cfg.d_ff, cfg.init_std
        self.w_up_df = _param(rngs, (D, F), ("embed", "mlp"), std)
        self.b_up_f = _const((F,), ("mlp",), 0.0)
        self.w_down_fd = _param(rngs, (F, D), ("mlp", "embed"), std)
        self.b_down_d = _const((D,), ("embed",), 0.0)

    def hidden(self, x_btd: Array) -> Array:
        """The post-activation MLP hidden state [B, T, F]: what the SAEs read."""
        dt = x_btd.dtype
        h_btf = jnp.einsum("btd,df->btf", x_btd, self.w_up_df[...].astype(dt)) + self.b_up_f[
            ...
        ].astype(dt)
        return constrain(jax.nn.gelu(h_btf, approximate=True), ("batch", "length", "act_mlp"))

    def __call__(self, x_btd: Array, edit: MLPEdit | None = None) -> tuple[Array, Array]:
        h_btf = self.hidden(x_btd)
        if edit is not None:  # e.g. an SAE's reconstruction spliced in, or features ablated
            h_btf = edit(h_btf).astype(h_btf.dtype)
        dt = x_btd.dtype
        out_btd = jnp.einsum("btf,fd->btd", h_btf, self.w_down_fd[...].astype(dt))
        return out_btd + self.b_down_d[...].astype(dt), h_btf


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: str, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(cfg)
        self.attn = Attention(cfg, kind, rngs)
        self.ln_2 = LayerNorm(cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_btd, *, q_slot_t, valid_bs, kv, write, edit=None):
        a_btd, new_kv = self.attn(
            self.ln_1(x_btd), q_slot_t=q_slot_t, valid_bs=valid_bs, kv=kv, write=write
        )
        x_btd = constrain(x_btd + a_btd, ("batch", "length", "act_embed"))
        m_btd, h_btf = self.mlp(self.ln_2(x_btd), edit)
        x_btd = constrain(x_btd + m_btd, ("batch", "length", "act_embed"))
        return x_btd, new_kv, h_btf


class GPTNeo(nnx.Module):
    """GPT-Neo causal LM, with one method per use and one return type each:

    `model(tokens)` float32 logits [B, T, V]; `model.hidden(tokens)` the final hidden state
    [B, T, D] (after ln_f, for a loss that fuses the output projection), `model.residual(tokens)`
    the same before ln_f; `model.mlp_activations(
    tokens, layers)` {layer: MLP hidden [B, T, F]}, stopping after the last layer asked for (what
    an SAE reads); `model.decode(tokens, cache)` (logits, cache) for sampling with a KV cache.
    `edit` (an `MLPEdit`) changes one layer's MLP hidden state on its way out: an SAE's
    reconstruction spliced in, or some of its features ablated; a `LayerEdits` changes several
    layers' in the same forward pass. `model.trace(tokens)` is a clean forward that keeps each
    block's input, and `model.resume(x, layer, edit=...)` runs a forward edited at `layer` or
    later from that block's input (one clean pass serves edits at many layers).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wte_vd = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        self.wpe_pd = _param(
            rngs, (cfg.max_positions, cfg.d_model), ("position", "embed"), cfg.init_std
        )
        self.blocks = nnx.List([Block(cfg, kind, rngs) for kind in cfg.attention_layers])
        self.ln_f = LayerNorm(cfg)

    def __call__(self, tokens_bt: Array, *, edit: MLPEdit | LayerEdits | None = None) -> Array:
        """Float32 logits [B, T, V]."""
        return self.unembed(self.hidden(tokens_bt, edit=edit))

    def hidden(self, tokens_bt: Array, *, edit: MLPEdit | LayerEdits | None = None) -> Array:
        """The final hidden state [B, T, D], after ln_f."""
        return self.ln_f(self.residual(tokens_bt, edit=edit))

    def residual(self, tokens_bt: Array, *, edit: MLPEdit | LayerEdits | None = None) -> Array:
        """The residual stream [B, T, D] after the last block, before ln_f (direct logit
        attribution needs ln_f's 1/std, which cannot be read back from its output)."""
        x_btd, _ = self._run(tokens_bt, edit=edit)
        return x_btd

    def unembed(self, x_btd: Array) -> Array:
        """Float32 logits [B, T, V] of a final hidden state (the tied output projection)."""
        dt = jnp.dtype(self.cfg.dtype)
        logits_btv = jnp.einsum(
            "btd,vd->btv", x_btd, self.wte_vd[...].astype(dt), preferred_element_type=jnp.float32
        )
        return constrain(logits_btv, ("batch", "length", "act_vocab"))

    def trace(self, tokens_bt: Array) -> tuple[Array, list[Array], list[Array]]:
        """One clean forward, kept: (the residual stream [B, T, D] after the last block, before
        ln_f; each block's input residual [L x [B, T, D]]; each block's MLP hidden state
        [L x [B, T, F]]). Forwards edited at one layer each resume from the block inputs
        (`resume`) instead of running the blocks before the edit again: for an 8-layer model and
        an edit at every layer, 8 blocks of clean forward + 36 edited, not 64."""
        x_btd, (inputs, hidden) = self._run(tokens_bt, keep=True)
        return x_btd, inputs, hidden

    def resume(
        self, x_btd: Array, layer: int, *, edit: MLPEdit | LayerEdits | None = None
    ) -> Array:
        """The residual stream [B, T, D] before ln_f after blocks `layer`, `layer` + 1, ... run on
        `x_btd`, the residual entering block `layer` (`trace`'s inputs[layer]):
        `self.residual(tokens, edit=edit)` for edits at `layer` or later, without the blocks
        before it. `self.unembed(self.ln_f(x))` are its logits."""
        x_btd, _ = self._run(None, resume=(layer, x_btd), edit=edit)
        return x_btd

    def mlp_activations(self, tokens_bt: Array, layers: Sequence[int]) -> dict[int, Array]:
        """{layer: MLP hidden state after the activation [B, T, F]} (TransformerLens'
        `blocks.N.mlp.hook_post`), computing no block past the last layer asked for."""
        layers = tuple(sorted(set(layers)))
        bad = [i for i in layers if not 0 <= i < self.cfg.n_layers]
        if bad or not layers:
            raise ValueError(f"layers={layers}: the model has layers 0..{self.cfg.n_layers - 1}")
        _, captured = self._run(tokens_bt, capture=layers)
        return captured

    def decode(
        self,
        tokens_bt: Array,
        cache: KVCache,
        *,
        positions_bt: Array | None = None,
        valid_bt: Array | None = None,
        edit: MLPEdit | LayerEdits | None = None,
    ) -> tuple[Array, KVCache]:
        """Logits [B, T, V] of `tokens_bt` written into cache slots [cache.next_slot,
        cache.next_slot + T), and the new cache. `valid_bt` marks real tokens (False for left
        padding); `positions_bt` defaults to the slot numbers."""
        B, T = tokens_bt.shape
        start = cache.next_slot
        valid_new = jnp.ones((B, T), bool) if valid_bt is None else valid_bt.astype(bool)
        valid_bs = jax.lax.dynamic_update_slice_in_dim(cache.valid_bs, valid_new, start, 1)
        x_btd, new_cache = self._run(
            tokens_bt, cache=cache, positions_bt=positions_bt, valid_bs=valid_bs, edit=edit
        )
        return self.unembed(self.ln_f(x_btd)), new_cache

    def _run(
        self,
        tokens_bt: Array | None,
        *,
        cache: KVCache | None = None,
        positions_bt: Array | None = None,
        valid_bs: Array | None = None,
        capture: tuple[int, ...] = (),
        edit: MLPEdit | LayerEdits | None = None,
        keep: bool = False,
        resume: tuple[int, Array] | None = None,
    ):
        """The blocks: (residual stream [B, T, D] before ln_f, new cache) or, with `capture`,
        (None, {layer: MLP hidden}) after the last captured layer; with `keep`, (residual,
        (every block's input, every block's MLP hidden)). `resume` = (layer, residual entering
        it) runs the blocks from that layer on (no cache), in place of embedding `tokens_bt`."""
        cfg = self.cfg
        edits = _edits_by_layer(edit, cfg.n_layers)
        first, x_btd = (0, None) if resume is None else resume
        if resume is not None and (cache is not None or not 0 <= first < cfg.n_layers):
            raise ValueError(f"resume at layer {first}: layers are 0..{cfg.n_layers - 1}, no cache")
        if any(i < first for i in edits):
            raise ValueError(f"an edit at layer {min(edits)}, before layer {first} resumed at")
        if x_btd is None:
            assert tokens_bt is not None, "tokens, or a residual to resume from"
            B, T = tokens_bt.shape
        else:
            B, T = x_btd.shape[:2]
        if cache is None and T > cfg.max_positions:
            # jnp indexing would clamp the positions past the table onto its last row, silently
            raise ValueError(f"{T} tokens exceed the model's {cfg.max_positions} positions")
        start = jnp.int32(0) if cache is None else cache.next_slot
        q_slot_t = start + jnp.arange(T, dtype=jnp.int32)
        if x_btd is None:
            if positions_bt is None:
                positions_bt = jnp.broadcast_to(q_slot_t, (B, T))
            res_dt = jnp.float32 if cfg.residual_float32 else jnp.dtype(cfg.dtype)
            x_btd = (self.wte_vd[...][tokens_bt] + self.wpe_pd[...][positions_bt]).astype(res_dt)
            x_btd = constrain(x_btd, ("batch", "length", "act_embed"))

        new_k, new_v, captured, inputs, hidden = [], [], {}, [], []
        for i, block in enumerate(self.blocks):
            if i < first:
                continue
            inputs.append(x_btd)
            kv = None if cache is None else (cache.k_lbsnh[i], cache.v_lbsnh[i])
            layer_edit = edits.get(i)
            if cfg.remat and cache is None and layer_edit is None:  # positional arguments only
                x_btd, (k_bsnh, v_bsnh), h_btf = _remat_block(block, x_btd, q_slot_t, valid_bs)
            else:
                x_btd, (k_bsnh, v_bsnh), h_btf = block(
                    x_btd, q_slot_t=q_slot_t, valid_bs=valid_bs, kv=kv, write=(start, T),
                    edit=layer_edit,
                )  # fmt: skip
            hidden.append(h_btf)
            if i in capture:
                captured[i] = h_btf
                if len(captured) == len(capture):
                    return None, captured
            if cache is not None:
                new_k.append(k_bsnh)
                new_v.append(v_bsnh)
        if cache is None:
            return x_btd, (inputs, hidden) if keep else None
        assert valid_bs is not None, "decode() passes the cache's updated valid slots"
        return x_btd, KVCache(jnp.stack(new_k), jnp.stack(new_v), valid_bs, start + T)


@nnx.remat
def _remat_block(block: Block, x_btd: Array, q_slot_t: Array, valid_bs: Array | None):
    """A block without a cache whose activations are recomputed in the backward pass."""
    return block(x_btd, q_slot_t=q_slot_t, valid_bs=valid_bs, kv=None, write=None)


def init_model(
    cfg: ModelConfig, seed: int = 0, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES
) -> GPTNeo:
    """A randomly initialised model; with a mesh, each parameter is created already sharded."""
    if mesh is None:
        return GPTNeo(cfg, rngs=nnx.Rngs(seed))
    abstract = nnx.eval_shape(lambda: GPTNeo(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = param_shardings(abstract_state, mesh, rules)

    @partial(jax.jit, out_shardings=shardings)
    def make(key):
        return nnx.state(GPTNeo(cfg, rngs=nnx.Rngs(params=key)))

    return nnx.merge(graphdef, make(jax.random.key(seed)))


def shard_model(model: GPTNeo, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> GPTNeo:
    """Place an existing model's parameters on a mesh as the rules table says."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, param_shardings(state, mesh, rules))
    return nnx.merge(graphdef, state)


def count_params(model: GPTNeo) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
