"""The SAE contract: one NNX module per architecture, its config, and a typed step output.

Dimension alphabet (jaxlm.model's, plus one letter): N activation rows (tokens) · F the SAE's input
width (`d_in`; here the MLP hidden width F) · S latents (`d_sae`). Weights are named by their dims
as SAELens names them by role: `W_enc_fs`, `W_dec_sf`, `b_enc_s`, `b_dec_f` (+ `threshold_s`).

Semantics mirror SAELens 6.54.12 (`sae_lens/saes/sae.py`: `SAE`, `TrainingSAE`): the input has
`b_dec` subtracted when `apply_b_dec_to_input`; `decode` is `acts @ W_dec + b_dec`; the MSE loss is
the squared error summed over F and averaged over rows; the total loss adds each variant's
auxiliary terms. Initialisation is SAELens's: `W_dec` Kaiming-uniform, each row rescaled to norm
`decoder_init_norm` (Anthropic's April 2024 heuristic), `W_enc = W_dec.T`, zero biases.

Every parameter names its logical axes; `SAE_RULES` maps them onto the jaxlm mesh: latents over
`fsdp` and `tensor`, activation rows over `data`, the F axis replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.typing import ArrayLike

from jaxlm.errors import UserError
from jaxlm.sharding import DEFAULT_RULES, Rules, constrain

Array = jax.Array

# jaxlm's rules table plus the SAE's own logical names (the model's names are untouched).
SAE_RULES: Rules = DEFAULT_RULES + (
    ("sae_latent", ("fsdp", "tensor")),  # S: latents split over the model-parallel axes
    ("sae_in", None),  # F: replicated
    ("sae_rows", "data"),  # N: activation rows over the data-parallel axis
)


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """One SAE's shape and training hyperparameters (SAELens 6.54.12 names and defaults).

    Fields a variant does not use are ignored by it; each says which variant reads it.
    """

    # a name in sae.registry: standard, topk, batchtopk, jumprelu, or a variant registered there
    architecture: str = "standard"
    d_in: int = 0  # F: input width (the MLP hidden width); filled from the model when 0
    d_sae: int | None = None  # S: latents; None: expansion_factor * d_in
    expansion_factor: int = 4  # SAELens 4.x default (6.x asks for d_sae outright)
    apply_b_dec_to_input: bool = True  # subtract b_dec from the input before encoding
    normalize_activations: Literal["none", "expected_average_only_in"] = "none"
    decoder_init_norm: float | None = 0.1  # W_dec row norm at init; None: plain Kaiming
    # standard (ReLU)
    l1_coefficient: float = 1.0  # weight of the decoder-norm-weighted L1 penalty
    lp_norm: float = 1.0  # p of that penalty's norm over latents
    l1_warm_up_steps: int = 0  # linear warm-up of l1_coefficient from 0
    # topk, batchtopk
    k: float = 100  # topk: latents kept per row (an integer); batchtopk: on average per row
    aux_loss_coefficient: float = 1.0  # dead-latent auxiliary reconstruction (AuxK) weight
    rescale_acts_by_decoder_norm: bool = True  # rank pre-activations as if W_dec rows had norm 1
    topk_threshold_lr: float = 0.01  # batchtopk: EMA rate of the inference threshold
    # jumprelu
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05  # width of the straight-through rectangle kernel
    jumprelu_sparsity_loss_mode: Literal["step", "tanh", "quadratic"] = "step"
    l0_coefficient: float = 1.0
    l0_warm_up_steps: int = 0
    pre_act_loss_coefficient: float | None = None  # Anthropic's dead-latent loss; None: off
    jumprelu_tanh_scale: float = 4.0  # tanh mode only
    jumprelu_ste_to_input: bool = False  # pass the STE gradient to the encoder too (Anthropic)
    target_l0: float | None = None  # quadratic mode only

    def __post_init__(self) -> None:
        if self.d_in < 0 or (self.d_sae is not None and self.d_sae < 1):
            raise UserError(f"sae.d_in={self.d_in}, sae.d_sae={self.d_sae}: must be positive")
        if self.expansion_factor < 1:
            raise UserError(f"sae.expansion_factor={self.expansion_factor} must be >= 1")
        if self.architecture == "topk" and (self.k != int(self.k) or self.k < 1):
            raise UserError(f"sae.k={self.k}: a topk SAE keeps a whole number >= 1 of latents")
        if self.architecture == "batchtopk" and self.k <= 0:
            raise UserError(f"sae.k={self.k} must be > 0")
        if self.jumprelu_sparsity_loss_mode == "quadratic" and not self.target_l0:
            raise UserError("sae.jumprelu_sparsity_loss_mode=quadratic needs sae.target_l0 > 0")

    @property
    def n_latents(self) -> int:
        """S."""
        return self.d_sae if self.d_sae is not None else self.expansion_factor * self.d_in

    def with_d_in(self, d_in: int) -> SAEConfig:
        if self.d_in and self.d_in != d_in:
            raise UserError(f"sae.d_in={self.d_in} but the activations have width {d_in}")
        return dataclasses.replace(self, d_in=d_in)


@struct.dataclass
class StepOutput:
    """What one training forward pass gives (SAELens's TrainStepOutput, as a frozen pytree)."""

    sae_out: Array  # [N, F] reconstruction
    feature_acts: Array  # [N, S]
    hidden_pre: Array  # [N, S] pre-activations
    mse_loss: Array  # [] squared error summed over F, mean over rows
    aux_losses: dict[str, Array]  # variant terms by SAELens's names ("l1_loss", ...)
    loss: Array  # [] mse_loss + every aux loss
    l0: Array  # [] mean number of non-zero latents per row

    @property
    def losses(self) -> dict[str, Array]:
        return {"mse_loss": self.mse_loss, **self.aux_losses}


class Buffer(nnx.Variable):
    """Non-trainable state updated by the training step (batchtopk's running threshold)."""


def _param(value: Array, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class SAE(nnx.Module):
    """Base SAE: linear encoder and decoder; variants define the activation and the aux losses."""

    architecture: ClassVar[str]  # the variant's name in sae.registry (and in saved cfg.json files)
    coefficient_names: ClassVar[tuple[str, ...]] = ()  # warmed-up loss weights, by name

    def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs):
        if not cfg.d_in:
            raise UserError("sae.d_in is unknown: set it or build the SAE from activations")
        self.cfg = cfg
        F, S = cfg.d_in, cfg.n_latents
        # torch.nn.init.kaiming_uniform_ on [S, F]: fan_in = F, gain sqrt(2): U(+-sqrt(6 / F)).
        bound = (6.0 / F) ** 0.5
        w_dec_sf = jax.random.uniform(rngs.params(), (S, F), jnp.float32, -bound, bound)
        if cfg.decoder_init_norm is not None:
            w_dec_sf = w_dec_sf / jnp.linalg.norm(w_dec_sf, axis=-1, keepdims=True)
            w_dec_sf = w_dec_sf * cfg.decoder_init_norm
        self.W_dec_sf = _param(w_dec_sf, ("sae_latent", "sae_in"))
        self.W_enc_fs = _param(w_dec_sf.T, ("sae_in", "sae_latent"))
        self.b_enc_s = _param(jnp.zeros((S,), jnp.float32), ("sae_latent",))
        self.b_dec_f = _param(jnp.zeros((F,), jnp.float32), ("sae_in",))

    # --- the inference contract -----------------------------------------------------------------

    def encode(self, x_nf: Array) -> Array:
        """Feature activations [N, S] of input rows [N, F]."""
        return self.encode_with_hidden_pre(x_nf)[0]

    def decode(self, acts_ns: Array) -> Array:
        """Reconstruction [N, F] of feature activations [N, S]."""
        return acts_ns @ self.W_dec_sf[...] + self.b_dec_f[...]

    def hidden_pre(self, x_nf: Array) -> Array:
        """Pre-activations [N, S]: (x - b_dec) @ W_enc + b_enc (SAELens `process_sae_in`)."""
        sae_in_nf = x_nf.astype(jnp.float32)
        if self.cfg.apply_b_dec_to_input:
            sae_in_nf = sae_in_nf - self.b_dec_f[...]
        pre_ns = sae_in_nf @ self.W_enc_fs[...] + self.b_enc_s[...]
        return constrain(pre_ns, ("sae_rows", "sae_latent"))

    def encode_with_hidden_pre(self, x_nf: Array) -> tuple[Array, Array]:
        """(feature acts [N, S], pre-activations [N, S]); the variant's activation function."""
        raise NotImplementedError

    def W_dec_norm_s(self) -> Array:
        return jnp.linalg.norm(self.W_dec_sf[...], axis=-1)  # [S]

    # --- training -------------------------------------------------------------------------------

    def __call__(
        self,
        x_nf: Array,
        *,
        coefficients: dict[str, Array | float] | None = None,
        dead_s: Array | None = None,
    ) -> StepOutput:
        """SAELens `training_forward_pass`: reconstruction, MSE, the variant's aux losses."""
        coefficients = coefficients or {}
        x_nf = x_nf.astype(jnp.float32)
        acts_ns, pre_ns, out_nf = self.encode_decode(x_nf)
        mse = jnp.square(out_nf - x_nf).sum(-1).mean()
        aux = self.aux_losses(x_nf, acts_ns, pre_ns, out_nf, coefficients, dead_s)
        loss = mse + sum(aux.values(), jnp.zeros((), jnp.float32))
        l0 = (acts_ns != 0).sum(-1).astype(jnp.float32).mean()
        return StepOutput(out_nf, acts_ns, pre_ns, mse, aux, loss, l0)

    def encode_decode(self, x_nf: Array) -> tuple[Array, Array, Array]:
        """The training forward's (acts [N, S], pre-activations [N, S], reconstruction [N, F]):
        `decode(acts)`, or a variant's faster way to the same reconstruction (topk's)."""
        acts_ns, pre_ns = self.encode_with_hidden_pre(x_nf)
        return acts_ns, pre_ns, self.decode(acts_ns)

    def aux_losses(
        self,
        x_nf: Array,
        acts_ns: Array,
        pre_ns: Array,
        out_nf: Array,
        coefficients: dict[str, Any],
        dead_s: Array | None,
    ) -> dict[str, Array]:
        return {}

    def coefficient_schedule(self) -> dict[str, tuple[float, int]]:
        """{name: (final value, warm-up steps)} for the loss weights the trainer warms up."""
        return {}

    def project(self) -> None:
        """Keep parameters in their domain before a training step (jumprelu: threshold >= 0)."""

    def after_step(self, out: StepOutput) -> None:
        """Update Buffer state from a training step's output (batchtopk's threshold)."""

    def fold_activation_scale(self, scale: float) -> None:
        """Make the SAE take raw activations when it was trained on activations * `scale`."""
        self.W_enc_fs[...] = self.W_enc_fs[...] * scale
        self.W_dec_sf[...] = self.W_dec_sf[...] / scale
        self.b_dec_f[...] = self.b_dec_f[...] / scale
        self.cfg = dataclasses.replace(self.cfg, normalize_activations="none")

    def inference_tensors(self) -> tuple[str, dict[str, Array]]:
        """(the architecture it is saved as, {SAELens tensor name: value}), as SAELens saves for
        inference. `sae.io.load_sae` looks that name up in the registry and calls `load_tensors`
        on a fresh SAE of it, so the name must be a registered one (batchtopk saves as jumprelu)."""
        return self.architecture, {
            "W_enc": self.W_enc_fs[...],
            "W_dec": self.W_dec_sf[...],
            "b_enc": self.b_enc_s[...],
            "b_dec": self.b_dec_f[...],
        }

    def load_tensors(self, tensors: Mapping[str, ArrayLike]) -> None:
        """Set the weights from SAELens tensor names (the inverse of `inference_tensors`)."""
        self.W_enc_fs[...] = jnp.asarray(tensors["W_enc"])
        self.W_dec_sf[...] = jnp.asarray(tensors["W_dec"])
        self.b_enc_s[...] = jnp.asarray(tensors["b_enc"])
        self.b_dec_f[...] = jnp.asarray(tensors["b_dec"])
