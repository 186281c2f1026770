"""The four SAE architectures, each mirroring one SAELens 6.54.12 training class.

standard   saes/standard_sae.py StandardTrainingSAE: ReLU, decoder-norm-weighted Lp penalty
topk       saes/topk_sae.py TopKTrainingSAE: the k largest pre-activations, AuxK dead-latent loss
batchtopk  saes/batchtopk_sae.py BatchTopKTrainingSAE: the k * N largest over the batch and a
           running threshold; saved as a jumprelu SAE, as SAELens does
jumprelu   saes/jumprelu_sae.py JumpReLUTrainingSAE: a learned per-latent threshold trained
           through the straight-through rectangle-kernel pseudo-gradients

Each class names itself (`architecture`); `sae.registry` registers these four under those names.
This module does not import the registry, so a new variant can subclass these without a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from sae.base import SAE, Array, Buffer, SAEConfig, StepOutput, _param


class StandardSAE(SAE):
    """ReLU SAE with the Anthropic April 2024 sparsity penalty ||acts * ||W_dec rows|| ||_p."""

    architecture = "standard"
    coefficient_names = ("l1",)

    def encode_with_hidden_pre(self, x_nf: Array) -> tuple[Array, Array]:
        pre_ns = self.hidden_pre(x_nf)
        return jax.nn.relu(pre_ns), pre_ns

    def coefficient_schedule(self) -> dict[str, tuple[float, int]]:
        return {"l1": (self.cfg.l1_coefficient, self.cfg.l1_warm_up_steps)}

    def aux_losses(self, x_nf, acts_ns, pre_ns, out_nf, coefficients, dead_s) -> dict[str, Array]:
        weighted_ns = acts_ns * self.W_dec_norm_s()
        p = self.cfg.lp_norm
        if p == 1.0:
            sparsity_n = jnp.abs(weighted_ns).sum(-1)
        else:
            sparsity_n = jnp.linalg.norm(weighted_ns, ord=p, axis=-1)
        return {"l1_loss": (coefficients.get("l1", self.cfg.l1_coefficient) * sparsity_n).mean()}


def _scatter_rows(values_nk: Array, index_nk: Array, shape: tuple[int, ...]) -> Array:
    """[N, S] zeros with row n's `values_nk[n]` at `index_nk[n]` (`shape` is [N, S])."""
    # top_k's indices are distinct in each row: saying so spares the scatter's derivative the
    # pass that finds which of several updates to one place wins
    rows_n1 = jnp.arange(shape[0])[:, None]
    zeros_ns = jnp.zeros(shape, values_nk.dtype)
    return zeros_ns.at[rows_n1, index_nk].set(values_nk, unique_indices=True)


def _rows_times(acts_nk: Array, index_nk: Array, W_sf: Array) -> Array:
    """sum_k acts[n, k] * W[index[n, k]] [N, F]: a sparse [N, S] matrix, held as each row's K
    (value, latent) pairs, times W [S, F], without the [N, S] matrix. A loop over K, each step N
    rows of W gathered and multiplied-added in one pass; the backward repeats the gathers
    (`checkpoint`: keeping them, [K, N, F], was slower) and scatter-adds W's gradient into just
    those rows."""

    @jax.checkpoint
    def add(out_nf: Array, pair: tuple[Array, Array]) -> tuple[Array, None]:
        a_n, i_n = pair  # the k-th pair of every row
        return out_nf + a_n[:, None] * W_sf[i_n], None

    zeros_nf = jnp.zeros((acts_nk.shape[0], W_sf.shape[-1]), acts_nk.dtype)
    return jax.lax.scan(add, zeros_nf, (acts_nk.T, index_nk.T))[0]


class TopKSAE(SAE):
    """Keeps each row's k largest pre-activations (ReLU'd); AuxK makes dead latents model the error.

    With `rescale_acts_by_decoder_norm`, pre-activations are multiplied by the decoder row norms
    before the top-k and divided by them again in `decode`, as SAELens does.
    """

    architecture = "topk"
    # The training forward reconstructs from each row's k (value, latent) pairs (`_rows_times`)
    # instead of the dense [N, S] acts: None, on a CPU backend (`encode_decode`); tests set it.
    sparse_decode: ClassVar[bool | None] = None

    def encode_with_hidden_pre(self, x_nf: Array) -> tuple[Array, Array]:
        pre_ns = self.hidden_pre(x_nf)
        if self.cfg.rescale_acts_by_decoder_norm:
            pre_ns = pre_ns * self.W_dec_norm_s()
        return self.activation(pre_ns), pre_ns

    def activation(self, pre_ns: Array) -> Array:
        return _scatter_rows(*self._top_k(pre_ns), pre_ns.shape)

    def _top_k(self, pre_ns: Array) -> tuple[Array, Array]:
        """Each row's k largest pre-activations, ReLU'd, and their latents: ([N, k], [N, k])."""
        values_nk, index_nk = jax.lax.top_k(pre_ns, int(self.cfg.k))
        return jax.nn.relu(values_nk), index_nk

    def _times_W_dec(self, acts: Array, index: Array | None = None) -> Array:
        """acts @ W_dec [N, F], undoing the decoder-norm rescale. With `index`, acts [N, K] hold
        only some latents: index [K] the same K for every row (their rows of W_dec), or index
        [N, K] each row's own (a sparse [N, S] matrix by its pairs, `_rows_times`)."""
        W_sf = self.W_dec_sf[...]
        if self.cfg.rescale_acts_by_decoder_norm:
            norm_s = self.W_dec_norm_s()
            acts = acts * (1 / (norm_s if index is None else norm_s[index]))
        if index is None:
            return acts @ W_sf
        if index.ndim == 1:
            return acts @ W_sf[index]
        return _rows_times(acts, index, W_sf)

    def decode(self, acts_ns: Array) -> Array:
        return self._times_W_dec(acts_ns) + self.b_dec_f[...]

    def encode_decode(self, x_nf: Array) -> tuple[Array, Array, Array]:
        acts_ns, pre_ns = self.encode_with_hidden_pre(x_nf)
        sparse = self.sparse_decode
        if sparse is None:
            sparse = jax.default_backend() == "cpu"
        if not sparse:
            return acts_ns, pre_ns, self.decode(acts_ns)
        # Only k of a row's S latents are non-zero: on a CPU, the reconstruction from those k
        # (and W_dec's gradient at their rows alone) beats decode's [N, S] x [S, F] matmul and
        # the two of its gradient (2 cores, scripts/bench_sae.py: the demo's 256 -> 1024, k 22
        # step 1.3x as fast, 1.2x with 80 dead latents; 512 -> 4096, k 32 1.4x). SAELens's
        # use_sparse_activations does the same with a sparse tensor. Accelerators keep the dense
        # matmuls (not measured there).
        # This is `activation`'s top-k again: XLA computes it once.
        values_nk, index_nk = self._top_k(pre_ns)
        return acts_ns, pre_ns, self._times_W_dec(values_nk, index_nk) + self.b_dec_f[...]

    def aux_losses(self, x_nf, acts_ns, pre_ns, out_nf, coefficients, dead_s) -> dict[str, Array]:
        return {"auxiliary_reconstruction_loss": self._auxk_loss(x_nf, out_nf, pre_ns, dead_s)}

    def _auxk_loss(self, x_nf, out_nf, pre_ns, dead_s) -> Array:
        # SAELens calculate_topk_aux_loss: the top k_aux = min(F // 2, #dead) dead latents
        # reconstruct the (detached) residual; scaled by min(#dead / (F // 2), 1).
        if dead_s is None:
            return jnp.zeros((), jnp.float32)
        k_aux_max = min(x_nf.shape[-1] // 2, pre_ns.shape[-1])
        n_dead = dead_s.sum()
        residual_nf = jax.lax.stop_gradient(x_nf - out_nf)

        def top(pre_ns: Array) -> Array:
            masked_ns = jnp.where(dead_s[None], pre_ns, -jnp.inf)
            values_nk, index_nk = jax.lax.top_k(masked_ns, k_aux_max)
            # Fewer dead latents than k_aux_max: the extra picks are live ones (-inf); drop them.
            values_nk = jnp.where(jnp.isfinite(values_nk), values_nk, 0.0)
            return self._times_W_dec(_scatter_rows(values_nk, index_nk, pre_ns.shape))

        def every_dead(pre_ns: Array) -> Array:
            # No more dead latents than k_aux_max: the top k_aux_max are every dead latent, so
            # the same reconstruction from those columns alone, without the top-k (on a CPU it
            # cost more than the step's matmuls together) and with [N, k_aux_max] matmuls in
            # place of [N, S] ones (`scripts/bench_sae.py --dead N` times it against SAELens).
            index_k = jnp.nonzero(dead_s, size=k_aux_max, fill_value=0)[0]
            acts_nk = jnp.where(jnp.arange(k_aux_max) < n_dead, pre_ns[:, index_k], 0.0)
            return self._times_W_dec(acts_nk, index_k)

        def auxk(pre_ns: Array) -> Array:
            recons_nf = jax.lax.cond(n_dead <= k_aux_max, every_dead, top, pre_ns)
            return jnp.square(recons_nf - residual_nf).sum(-1).mean()

        # SAELens skips the loss when no latent is dead (so in every one of the first
        # dead_feature_window steps); a cond skips its top-k and its three matmuls likewise
        none = lambda pre_ns: jnp.zeros((), jnp.float32)  # noqa: E731
        scale = jnp.minimum(n_dead / (x_nf.shape[-1] // 2), 1.0)
        return self.cfg.aux_loss_coefficient * scale * jax.lax.cond(n_dead > 0, auxk, none, pre_ns)

    def _folded(self) -> dict[str, Array]:
        _, t = SAE.inference_tensors(self)
        if self.cfg.rescale_acts_by_decoder_norm:  # SAELens _fold_norm_topk
            n_s = self.W_dec_norm_s()
            t = {**t, "b_enc": t["b_enc"] * n_s, "W_dec": t["W_dec"] / n_s[:, None],
                 "W_enc": t["W_enc"] * n_s[None, :]}  # fmt: skip
        return t

    def inference_tensors(self) -> tuple[str, dict[str, Array]]:
        return "topk", self._folded()


class BatchTopKSAE(TopKSAE):
    """Keeps the k * N largest ReLU'd pre-activations of the whole batch of N rows.

    A running threshold (the EMA of the smallest kept activation) becomes a JumpReLU threshold at
    save time, so a saved batchtopk SAE is a `jumprelu` SAE, exactly as SAELens saves it.
    SAELens keeps that threshold in float64; here it is float32 (jax's default precision).
    """

    architecture = "batchtopk"

    def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.topk_threshold = Buffer(jnp.zeros((), jnp.float32))

    # not k latents a row, so no per-row pairs to decode from: the dense decode of the acts
    encode_decode = SAE.encode_decode

    def activation(self, pre_ns: Array) -> Array:
        acts_ns = jax.nn.relu(pre_ns)
        flat = acts_ns.reshape(-1)
        values, index = jax.lax.top_k(flat, int(self.cfg.k * pre_ns.shape[0]))
        return jnp.zeros_like(flat).at[index].set(values).reshape(acts_ns.shape)

    def after_step(self, out: StepOutput) -> None:
        acts_ns = jax.lax.stop_gradient(out.feature_acts)
        positive = acts_ns > 0
        min_positive = jnp.min(jnp.where(positive, acts_ns, jnp.inf))
        lr = self.cfg.topk_threshold_lr
        new = (1 - lr) * self.topk_threshold[...] + lr * min_positive
        self.topk_threshold[...] = jnp.where(positive.any(), new, self.topk_threshold[...])

    def fold_activation_scale(self, scale: float) -> None:
        super().fold_activation_scale(scale)
        if self.cfg.rescale_acts_by_decoder_norm:  # SAELens #763: threshold in W_dec-norm units
            self.topk_threshold[...] = self.topk_threshold[...] / scale

    def inference_tensors(self) -> tuple[str, dict[str, Array]]:
        t = self._folded()
        t["threshold"] = jnp.ones_like(t["b_enc"]) * self.topk_threshold[...]
        return "jumprelu", t


def _rectangle(x: Array) -> Array:
    return ((x > -0.5) & (x < 0.5)).astype(x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def jumprelu(x_ns: Array, threshold_s: Array, bandwidth: float, ste_to_input: bool) -> Array:
    """relu(x) * (x > threshold), with SAELens's JumpReLU.backward pseudo-gradient.

    The relu is SAELens's inference JumpReLUSAE; its training class drops it, which is the same
    for the thresholds >= 0 that `JumpReLUSAE.project` keeps during training.
    """
    return jax.nn.relu(x_ns) * (x_ns > threshold_s).astype(x_ns.dtype)


def _jumprelu_fwd(x_ns, threshold_s, bandwidth, ste_to_input):
    return jumprelu(x_ns, threshold_s, bandwidth, ste_to_input), (x_ns, threshold_s)


def _jumprelu_bwd(bandwidth, ste_to_input, res, g_ns):
    x_ns, threshold_s = res
    ste_ns = (threshold_s / bandwidth) * _rectangle((x_ns - threshold_s) / bandwidth) * g_ns
    x_grad = (x_ns > threshold_s).astype(g_ns.dtype) * g_ns
    if ste_to_input:
        x_grad = x_grad + ste_ns
    return x_grad, jnp.sum(-ste_ns, axis=0)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def step(x_ns: Array, threshold_s: Array, bandwidth: float, ste_to_input: bool) -> Array:
    """Heaviside(x - threshold), with SAELens's Step.backward pseudo-gradient."""
    return (x_ns > threshold_s).astype(x_ns.dtype)


def _step_fwd(x_ns, threshold_s, bandwidth, ste_to_input):
    return step(x_ns, threshold_s, bandwidth, ste_to_input), (x_ns, threshold_s)


def _step_bwd(bandwidth, ste_to_input, res, g_ns):
    x_ns, threshold_s = res
    ste_ns = (1.0 / bandwidth) * _rectangle((x_ns - threshold_s) / bandwidth) * g_ns
    x_grad = ste_ns if ste_to_input else jnp.zeros_like(x_ns)
    return x_grad, jnp.sum(-ste_ns, axis=0)


step.defvjp(_step_fwd, _step_bwd)


class JumpReLUSAE(SAE):
    """JumpReLU SAE (Rajamanoharan et al. 2024) with SAELens's directly parameterised threshold."""

    architecture = "jumprelu"
    coefficient_names = ("l0",)

    def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        init = jnp.full((cfg.n_latents,), cfg.jumprelu_init_threshold, jnp.float32)
        self.threshold_s = _param(init, ("sae_latent",))

    def encode_with_hidden_pre(self, x_nf: Array) -> tuple[Array, Array]:
        pre_ns = self.hidden_pre(x_nf)
        c = self.cfg
        acts_ns = jumprelu(
            pre_ns, self.threshold_s[...], c.jumprelu_bandwidth, c.jumprelu_ste_to_input
        )
        return acts_ns, pre_ns

    def coefficient_schedule(self) -> dict[str, tuple[float, int]]:
        return {"l0": (self.cfg.l0_coefficient, self.cfg.l0_warm_up_steps)}

    def project(self) -> None:
        self.threshold_s[...] = jnp.maximum(self.threshold_s[...], 0.0)

    def aux_losses(self, x_nf, acts_ns, pre_ns, out_nf, coefficients, dead_s) -> dict[str, Array]:
        c, th_s, norm_s = self.cfg, self.threshold_s[...], self.W_dec_norm_s()
        coef: Any = coefficients.get("l0", c.l0_coefficient)
        if c.jumprelu_sparsity_loss_mode == "tanh":
            per_row = jnp.tanh(c.jumprelu_tanh_scale * acts_ns * norm_s).sum(-1)
        else:
            l0_n = step(pre_ns, th_s, c.jumprelu_bandwidth, c.jumprelu_ste_to_input).sum(-1)
            per_row = l0_n
            if c.jumprelu_sparsity_loss_mode == "quadratic":
                assert c.target_l0  # the config refuses quadratic mode without target_l0 > 0
                per_row = 2 / c.target_l0 * jnp.square(l0_n - c.target_l0)
        losses = {"l0_loss": (coef * per_row).mean()}
        if c.pre_act_loss_coefficient is not None:
            if dead_s is None:
                losses["pre_act_loss"] = jnp.zeros((), jnp.float32)
            else:
                per = (jax.nn.relu(th_s - pre_ns) * dead_s * norm_s).sum(-1)
                losses["pre_act_loss"] = c.pre_act_loss_coefficient * per.mean()
        return losses

    def inference_tensors(self) -> tuple[str, dict[str, Array]]:
        _, t = SAE.inference_tensors(self)
        return "jumprelu", {**t, "threshold": self.threshold_s[...]}

    def load_tensors(self, tensors: Mapping[str, ArrayLike]) -> None:
        super().load_tensors(tensors)
        self.threshold_s[...] = jnp.asarray(tensors["threshold"])
