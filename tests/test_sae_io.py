"""Saved SAEs: a bit-exact round trip, SAELens's cfg.json keys, and SAELens's own loader reading
them (and ours reading SAELens's files) with the same activations and reconstructions."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from sae.base import SAEConfig
from sae.io import load_sae, save_sae
from sae.registry import create
from tests.helpers_sae_lens import sae_lens, training_class

F, S = 16, 40
ARCHS = [("standard", {}), ("topk", {"k": 5}), ("batchtopk", {"k": 4.0}), ("jumprelu", {})]


def _trained_like(arch, kw, seed=0):
    """An SAE whose parameters are all off their init (biases, thresholds, decoder norms)."""
    sae = create(SAEConfig(architecture=arch, d_in=F, d_sae=S, **kw), seed=seed)
    rng = np.random.default_rng(seed)
    _, t = sae.inference_tensors()
    sae.load_tensors(
        {k: np.asarray(v) + 0.2 * rng.standard_normal(v.shape, np.float32) for k, v in t.items()}
    )
    if arch == "jumprelu":
        sae.threshold_s[...] = jnp.asarray(rng.uniform(0, 0.3, S), jnp.float32)
    if arch == "batchtopk":
        sae.topk_threshold[...] = jnp.float32(0.15)
    return sae


def _x(n=24, seed=3):
    return np.random.default_rng(seed).standard_normal((n, F)).astype(np.float32)


@pytest.mark.parametrize(("arch", "kw"), ARCHS, ids=[a for a, _ in ARCHS])
def test_round_trip_is_bit_exact_and_sae_lens_reads_it(tmp_path, arch, kw):
    sae = _trained_like(arch, kw)
    save_sae(tmp_path, sae, layer=3, model_path="/m", context_size=32)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for key in (
        "d_in",
        "d_sae",
        "architecture",
        "dtype",
        "apply_b_dec_to_input",
        "normalize_activations",
        "reshape_activations",
        "metadata",
        "jaxlm",
    ):
        assert key in cfg, key
    assert cfg["metadata"]["hook_name"] == "blocks.3.mlp.hook_post"
    assert cfg["jaxlm"]["layer"] == 3 and cfg["jaxlm"]["model_path"] == "/m"
    loaded, info = load_sae(tmp_path)
    assert info.layer == 3 and info.model_path == "/m"
    arch_saved, t0 = sae.inference_tensors()
    assert cfg["architecture"] == arch_saved == loaded.architecture
    # what was saved is exactly what was meant to be, and exactly what the loaded SAE holds
    on_disk = load_file(str(tmp_path / "sae_weights.safetensors"))
    held = {
        "W_enc": loaded.W_enc_fs,
        "W_dec": loaded.W_dec_sf,
        "b_enc": loaded.b_enc_s,
        "b_dec": loaded.b_dec_f,
        "threshold": getattr(loaded, "threshold_s", None),
    }
    assert sorted(on_disk) == sorted(t0)
    for k in t0:
        assert np.array_equal(np.asarray(t0[k]), on_disk[k]), k
        assert np.array_equal(np.asarray(held[k][...]), on_disk[k]), k
    x = _x()
    # A saved batchtopk SAE is a jumprelu one (as in SAELens): its encoding is the threshold's.
    # A topk SAE is saved with its decoder norms folded in: equal up to that float rescaling.
    if arch in ("standard", "jumprelu"):
        assert np.array_equal(np.asarray(sae.encode(x)), np.asarray(loaded.encode(x)))
    elif arch == "topk":
        np.testing.assert_allclose(sae.encode(x), loaded.encode(x), atol=1e-5, rtol=1e-5)

    sae_lens()  # before importing from it: the helper sets the package up
    from sae_lens.saes.sae import SAE as SAELensSAE

    ref = SAELensSAE.load_from_disk(str(tmp_path))
    assert ref.cfg.architecture() == arch_saved
    xt = torch.from_numpy(x)
    acts = loaded.encode(x)
    np.testing.assert_allclose(
        np.asarray(acts), ref.encode(xt).detach().numpy(), atol=1e-5, rtol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(loaded.decode(acts)),
        ref.decode(ref.encode(xt)).detach().numpy(),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_reads_what_sae_lens_saves(tmp_path, arch):
    cls, cfg_cls = training_class(arch)
    torch.manual_seed(0)
    ref = cls(cfg_cls(d_in=F, d_sae=S, **({"k": 5} if arch == "topk" else {})))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ref.save_inference_model(str(tmp_path))
    ours, _ = load_sae(tmp_path)
    from sae_lens.saes.sae import SAE as SAELensSAE

    inf = SAELensSAE.load_from_disk(str(tmp_path))
    x = _x()
    np.testing.assert_allclose(
        np.asarray(ours.encode(x)),
        inf.encode(torch.from_numpy(x)).detach().numpy(),
        atol=1e-5,
        rtol=1e-5,
    )
