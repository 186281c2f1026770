"""Saved SAEs: a bit-exact round trip, SAELens's cfg.json keys, and SAELens's own loader reading
them (and ours reading SAELens's files) with the same activations and reconstructions."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from jaxlm.errors import UserError
from sae.base import SAEConfig
from sae.io import load_sae, mlp_layer, save_sae
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


# --- hand-made SAELens directories (4.x and 6.x layouts) and one-line errors -------------------

FH, SH = 16, 12  # a hand-made SAE's d_in, d_sae


def _tensors(seed=1, jumprelu=False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(FH, SH)).astype(np.float32)
    t = {"W_enc": W, "b_enc": np.full(SH, -0.3, np.float32), "W_dec": W.T.copy(),
         "b_dec": rng.normal(0, 0.05, FH).astype(np.float32)}  # fmt: skip
    if jumprelu:
        t["threshold"] = np.linspace(0, 2, SH).astype(np.float32)
    return t


def _write(d, cfg: dict, tensors: dict[str, np.ndarray]):
    """A directory as SAELens (or a person) writes it: cfg.json + sae_weights.safetensors."""
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "cfg.json").write_text(json.dumps({"d_in": FH, "d_sae": SH, **cfg}))
    save_file(tensors, str(d / "sae_weights.safetensors"))
    return d


def _pre(t, x, b_dec=True):
    return (x - (t["b_dec"] if b_dec else 0)) @ t["W_enc"] + t["b_enc"]


def _topk(pre, k):
    kth = np.sort(pre, -1)[:, -k][:, None]
    return np.where(pre >= kth, np.maximum(pre, 0), 0)


def test_reads_hand_made_sae_lens_layouts(tmp_path):
    x = np.random.default_rng(0).normal(size=(7, FH)).astype(np.float32)
    t, tj = _tensors(), _tensors(jumprelu=True)
    hook6 = {"metadata": {"hook_name": "blocks.1.mlp.hook_post"}}
    cases = [  # (cfg.json, tensors, class name, layer, the encoder written out)
        ({"architecture": "standard", **hook6}, t, "StandardSAE", 1,
         np.maximum(_pre(t, x), 0)),
        ({"architecture": "standard", "apply_b_dec_to_input": False}, t, "StandardSAE", None,
         np.maximum(_pre(t, x, b_dec=False), 0)),
        ({"architecture": "topk", "k": 2, **hook6}, t, "TopKSAE", 1, _topk(_pre(t, x), 2)),
        ({"architecture": "jumprelu", **hook6}, tj, "JumpReLUSAE", 1,
         np.where(_pre(tj, x) > tj["threshold"], np.maximum(_pre(tj, x), 0), 0)),
        ({"architecture": "standard", "activation_fn_str": "topk",  # SAELens 4.x
          "activation_fn_kwargs": {"k": 3}, "hook_name": "blocks.2.mlp.hook_post",
          "hook_layer": 2}, t, "TopKSAE", 2, _topk(_pre(t, x), 3)),
    ]  # fmt: skip
    for i, (cfg, tensors, cls, layer, want) in enumerate(cases):
        sae, info = load_sae(_write(tmp_path / str(i), cfg, tensors))
        assert type(sae).__name__ == cls and info.layer == layer, (i, cfg)
        np.testing.assert_allclose(np.asarray(sae.encode(x)), want, atol=1e-5, err_msg=str(cfg))
        np.testing.assert_array_equal(np.asarray(sae.W_dec_sf[...]), tensors["W_dec"])


def test_mlp_layer_resolution():
    assert mlp_layer({"metadata": {"hook_name": "blocks.3.mlp.hook_post"}}) == 3  # SAELens 6.x
    assert mlp_layer({"hook_name": "blocks.4.mlp.hook_post", "hook_layer": 4}) == 4  # 4.x
    assert mlp_layer({"jaxlm": {"layer": 2}, "hook_name": "blocks.3.mlp.hook_post"}) == 2
    assert mlp_layer({"hook_layer": 5}) == 5
    assert mlp_layer({"hook_name": "embed"}) is None and mlp_layer({}) is None
    for hook in ("blocks.2.mlp.hook_pre", "blocks.2.hook_resid_post"):
        with pytest.raises(UserError, match=f"reads {hook}; jaxlm feeds SAEs the MLP's post"):
            mlp_layer({"hook_layer": 2, "hook_name": hook})


def _drop(name):
    return lambda d: _write(d, {"architecture": "standard"},
                            {k: v for k, v in _tensors().items() if k != name})  # fmt: skip


BAD = [  # (how to spoil a directory, what the one-line error says)
    (lambda d: d.mkdir(), "cfg.json: cannot read"),
    (lambda d: _write(d, {}, _tensors()) and (d / "cfg.json").write_text("{"),
     "cfg.json: cannot read"),
    (lambda d: _write(d, {}, _tensors()) and (d / "sae_weights.safetensors").unlink(),
     "sae_weights.safetensors: missing"),
    (lambda d: _write(d, {}, _tensors()) and (d / "sae_weights.safetensors").write_bytes(b"xx"),
     "sae_weights.safetensors: cannot read"),
    (_drop("W_dec"), "sae_weights.safetensors: tensor 'W_dec' is missing"),
    (lambda d: _write(d, {}, {**_tensors(), "b_enc": np.zeros(SH - 1, np.float32)}),
     f"b_enc has shape ({SH - 1},); d_in={FH}, d_sae={SH} in cfg.json make it ({SH},)"),
    (lambda d: _write(d, {"architecture": "jumprelu"}, _tensors()),
     "tensor 'threshold' is missing"),
    (lambda d: _write(d, {"architecture": "topk"}, _tensors()), "a topk SAE needs an integer k"),
    (lambda d: _write(d, {"architecture": "topk", "k": 2.5}, _tensors()), "needs an integer k"),
    (lambda d: _write(d, {"metadata": {"hook_name": "blocks.2.mlp.hook_pre"}}, _tensors()),
     "the SAE reads blocks.2.mlp.hook_pre"),
    (lambda d: _write(d, {"architecture": "gated"}, _tensors()),
     "architecture 'gated'; known ones are batchtopk, jumprelu, standard"),
    (lambda d: _write(d, {"architecture": "batchtopk", "k": 2}, _tensors(jumprelu=True)),
     "a batchtopk SAE is saved as jumprelu"),
    (lambda d: _write(d, {"normalize_activations": "layer_norm"}, _tensors()),
     "normalize_activations='layer_norm' is not one jaxlm can apply"),
    (lambda d: _write(d, {"activation_fn_str": "tanh-relu"}, _tensors()),
     "activation_fn_str='tanh-relu'"),
    (lambda d: _write(d, {"d_sae": None}, _tensors()), "d_sae=None: need two positive integers"),
]  # fmt: skip


@pytest.mark.parametrize(("spoil", "msg"), BAD, ids=[m[:28] for _, m in BAD])
def test_bad_directories_are_one_line_errors(tmp_path, spoil, msg):
    d = tmp_path / "sae"
    spoil(d)
    with pytest.raises(UserError) as e:
        load_sae(d)
    text = str(e.value)
    assert msg in text and str(d) in text and "\n" not in text, text


def test_a_normalised_sae_loads_as_one(tmp_path):
    """SAELens's expected_average_only_in is read (the analyses refuse it: they feed raw
    activations, and training folds the scale in before saving)."""
    sae, _ = load_sae(_write(tmp_path, {"normalize_activations": "expected_average_only_in"},
                             _tensors()))  # fmt: skip
    assert sae.cfg.normalize_activations == "expected_average_only_in"
