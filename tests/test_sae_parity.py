"""Each SAE architecture against SAELens 6.54.12 (PyTorch) with the same weights and inputs:
feature activations, reconstruction, every loss term and every parameter's (pseudo-)gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sae.base import SAEConfig
from sae.registry import create
from sae.variants import TopKSAE
from tests.helpers_sae_lens import training_class

TOL = 1e-5  # float32 simple ops (STYLE)
F, S, N = 16, 48, 32

CASES = [
    ("standard", {"l1_coefficient": 0.7}),
    ("standard", {"lp_norm": 2.0}),
    ("topk", {"k": 6}),
    ("topk", {"k": 6, "rescale_acts_by_decoder_norm": False, "aux_loss_coefficient": 0.5}),
    ("batchtopk", {"k": 5.5, "topk_threshold_lr": 0.1}),
    ("jumprelu", {"jumprelu_bandwidth": 0.5}),
    (
        "jumprelu",
        {"jumprelu_bandwidth": 0.5, "jumprelu_ste_to_input": True, "pre_act_loss_coefficient": 0.1},
    ),  # fmt: skip
    ("jumprelu", {"jumprelu_sparsity_loss_mode": "tanh"}),
    (
        "jumprelu",
        {"jumprelu_bandwidth": 0.5, "jumprelu_sparsity_loss_mode": "quadratic", "target_l0": 5.0},
    ),  # fmt: skip
]
COEF = {"standard": {"l1": 0.35}, "jumprelu": {"l0": 0.25}}

# our parameter name -> SAELens's
NAMES = {"W_enc_fs": "W_enc", "W_dec_sf": "W_dec", "b_enc_s": "b_enc", "b_dec_f": "b_dec",
         "threshold_s": "threshold"}  # fmt: skip


def _pair(arch, kw, seed=0):
    cls, cfg_cls = training_class(arch)
    torch.manual_seed(seed)
    ref = cls(cfg_cls(d_in=F, d_sae=S, **kw))
    with torch.no_grad():  # move every parameter off its init so biases and thresholds matter
        for name, p in ref.named_parameters():
            p.add_(0.3 * torch.randn_like(p))
            if name == "threshold":
                p.copy_(0.4 * torch.rand_like(p) - 0.05)  # a few negative: the clamp is tested too
    ours = create(SAEConfig(architecture=arch, d_in=F, d_sae=S, **kw))
    ours.load_tensors(
        {k: v.detach().numpy() for k, v in ref.state_dict().items() if k in NAMES.values()}
    )
    return ref, ours


def _inputs(seed=1, dead_p=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, F, generator=g)
    dead = torch.rand(S, generator=g) < dead_p
    return x, dead


def _close(name, ours, ref, report):
    ours, ref = np.asarray(ours), ref.detach().double().numpy()
    report[name] = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=TOL, err_msg=name)


@pytest.mark.parametrize(("arch", "kw"), CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_matches_sae_lens(arch, kw):
    _check(arch, kw, 0.3)  # topk: 14 dead latents, more than k_aux (F // 2 = 8): the top-k picks


def test_topk_with_few_dead_latents_matches_sae_lens():
    """No more dead latents than k_aux: AuxK takes every one without a top-k (a shortcut)."""
    x, dead = _inputs(dead_p=0.1)
    assert 0 < int(dead.sum()) <= F // 2
    _check("topk", {"k": 6}, 0.1)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-decode", "dense-decode"])
@pytest.mark.parametrize(
    "kw", [{}, {"rescale_acts_by_decoder_norm": False}], ids=["rescaled", "plain"]
)
def test_topk_training_decode_matches_sae_lens(sparse, kw, monkeypatch):
    """TopK's training forward both ways: from each row's k pairs (a CPU's default, so the cases
    above take it) and through the dense acts (accelerators'), with many and few dead latents."""
    monkeypatch.setattr(TopKSAE, "sparse_decode", sparse)
    sae = create(SAEConfig(architecture="topk", d_in=F, d_sae=S, k=6, **kw))
    x, _ = _inputs()
    jaxpr = str(jax.make_jaxpr(lambda x: sae(x).loss)(jnp.asarray(x.numpy())))
    assert ("scan" in jaxpr) == sparse  # the path asked for is the one taken
    for dead_p in (0.3, 0.1):
        _check("topk", {"k": 6, **kw}, dead_p)


def _check(arch, kw, dead_p):
    ref, ours = _pair(arch, kw)
    from sae_lens.saes.sae import TrainStepInput

    x, dead = _inputs(dead_p=dead_p)
    coef = COEF.get(arch, {})
    out_ref = ref.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients=coef,
            dead_neuron_mask=dead,
            n_training_steps=0,
            is_logging_step=False,
        )  # fmt: skip
    )
    out_ref.loss.backward()

    ours.project()
    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)

    def loss_fn(p):
        sae = nnx.merge(graphdef, p, rest)
        out = sae(jnp.asarray(x.numpy()), coefficients=coef, dead_s=jnp.asarray(dead.numpy()))
        return out.loss, (out, sae)

    (loss, (out, sae)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    report = {}
    _close("feature_acts", out.feature_acts, out_ref.feature_acts, report)
    _close("hidden_pre", out.hidden_pre, out_ref.hidden_pre, report)
    _close("sae_out", out.sae_out, out_ref.sae_out, report)
    assert sorted(out.losses) == sorted(out_ref.losses)
    for name, value in out_ref.losses.items():
        _close(name, out.losses[name], value, report)
    _close("loss", loss, out_ref.loss, report)
    for ours_name, ref_name in NAMES.items():
        if ours_name in grads:
            _close(f"grad {ref_name}", grads[ours_name][...], getattr(ref, ref_name).grad, report)
    if arch == "batchtopk":
        sae.after_step(out)
        _close("topk_threshold", sae.topk_threshold[...], ref.topk_threshold, report)
    # the checks above can fail: every gradient that SAELens defines is non-trivial here
    assert all(float(jnp.abs(g[...]).max()) > 0 for g in jax.tree.leaves(grads)), arch
    print(arch, kw, {k: f"{v:.1e}" for k, v in report.items()})


def test_jumprelu_pseudo_gradient_reaches_the_threshold():
    """The threshold's only gradient is the rectangle-kernel estimate: check it is the one used."""
    ref, ours = _pair("jumprelu", {"jumprelu_bandwidth": 0.5})
    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
    x, _ = _inputs()
    g = jax.grad(lambda p: nnx.merge(graphdef, p, rest)(jnp.asarray(x.numpy())).loss)(params)
    assert float(jnp.abs(g["threshold_s"][...]).max()) > 1e-3
