"""A new SAE variant is written once: a toy defined here, registered, goes through `sae train`,
the saved directory, `load_sae`, `sae tsea` and `sae dashboard` with its own activations; a taken
name is refused; the variants module does not import the registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxlm.cli import main as jaxlm_main
from jaxlm.errors import UserError
from sae import registry
from sae.base import SAEConfig
from sae.io import load_sae, save_sae
from sae.registry import register
from sae.variants import StandardSAE, TopKSAE

REPO = Path(__file__).resolve().parents[1]
LAYER = 3
TOY = "test_squared_relu"
ROUNDED = 6e-6  # the dashboards write activations to 5 decimals: half a unit, plus fp32 error


@register
class SquaredReLUSAE(StandardSAE):
    """relu(pre) ** 2, with the standard SAE's L1 penalty: no built-in encodes like that, so an
    analysis that fell back to a built-in encoder would show other activations."""

    architecture = TOY

    def encode_with_hidden_pre(self, x_nf):
        pre_ns = self.hidden_pre(x_nf)
        return jax.nn.relu(pre_ns) ** 2, pre_ns


def _squared_relu(t: dict, x_nf: np.ndarray) -> np.ndarray:
    """The toy's encoder written out in numpy from its saved tensors (float64)."""
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    return np.maximum((x_nf - t["b_dec"]) @ t["W_enc"] + t["b_enc"], 0) ** 2


def _cli(*argv: str) -> int:
    return jaxlm_main(["sae", *argv])


def test_toy_round_trips_through_save_and_load(tmp_path):
    sae = registry.create(SAEConfig(architecture=TOY, d_in=16, d_sae=12), seed=1)
    rng = np.random.default_rng(0)
    _, t = sae.inference_tensors()
    sae.load_tensors({k: np.asarray(v) + 0.2 * rng.standard_normal(v.shape) for k, v in t.items()})
    save_sae(tmp_path, sae, layer=2)
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == TOY
    loaded, info = load_sae(tmp_path)
    assert type(loaded) is SquaredReLUSAE and info.layer == 2
    _, want = sae.inference_tensors()
    _, got = loaded.inference_tensors()
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(np.asarray(got[k]), np.asarray(want[k])) for k in want)
    x = rng.standard_normal((9, 16)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(loaded.encode(x)), np.asarray(sae.encode(x)))
    np.testing.assert_allclose(np.asarray(loaded.encode(x)), _squared_relu(want, x), atol=1e-5)


def test_a_taken_name_is_refused():
    class AnotherTopK(StandardSAE):
        architecture = "topk"

    with pytest.raises(UserError, match="SAE architecture 'topk' is taken"):
        register(AnotherTopK)
    with pytest.raises(UserError, match=f"SAE architecture '{TOY}' is taken"):
        register(SquaredReLUSAE)
    assert registry.get("topk") is TopKSAE and registry.get(TOY) is SquaredReLUSAE

    class Unnamed(StandardSAE):  # would inherit "standard"
        pass

    with pytest.raises(UserError, match="Unnamed names no architecture"):
        register(Unnamed)
    assert registry.get("standard") is StandardSAE


def test_variants_do_not_import_the_registry():
    code = "import sys, sae.variants; print('sae.registry' in sys.modules)"
    env = {"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_toy_goes_through_train_tsea_and_dashboard(demo_data, tmp_path, capsys):
    from jaxlm.checkpoint import load_model
    from jaxlm.tokenizer import Tokenizer
    from sae.activations import capture_fn
    from sae.analysis import dashboards as db
    from sae.analysis import tsea

    m, out = tmp_path / "m", tmp_path / "sae"
    assert jaxlm_main(["init", "--preset", "ts-1m", "--vocab-size", "400", "--tokenizer",
                       str(demo_data["tok"]), "--out", str(m)]) == 0  # fmt: skip
    assert _cli("train", "--model", str(m), "--layer", str(LAYER), "--data",
                str(demo_data["translated"]), "--out", str(out), "--config",
                str(REPO / "configs/sae/tiny.yaml"), "--architecture", TOY,
                "--training-tokens", "512", "--set", "sae.decoder_init_norm=1.0",
                "--set", "log.progress=false", "--set", "log.plot=false",
                "--set", "eval.rows=8") == 0  # fmt: skip
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == TOY == cfg["jaxlm"]["sae_config"]["architecture"]

    # the saved directory reads back as the toy, with the saved weights and the toy's encoder
    sae, info = load_sae(out)
    assert type(sae) is SquaredReLUSAE and info.layer == LAYER
    on_disk = load_file(str(out / "sae_weights.safetensors"))
    _, held = sae.inference_tensors()
    assert sorted(on_disk) == sorted(held)
    assert all(np.array_equal(np.asarray(held[k]), on_disk[k]) for k in on_disk)
    model, minfo = load_model(m)
    rows = np.concatenate(list(db.read_rows(demo_data["translated"], max_rows=16, batch_size=8)))
    h_nf = np.asarray(capture_fn(model, LAYER)(rows))  # [16 * T, F]
    acts_ns = np.asarray(sae.encode(h_nf))
    np.testing.assert_allclose(acts_ns, _squared_relu(on_disk, h_nf), atol=1e-5, rtol=1e-4)

    # sae tsea: exit 0, over the toy's decoder
    capsys.readouterr()
    assert _cli("tsea", "--model", str(m), "--sae", str(out), "--regex", "spaced=^ ",
                "--null-directions", "8", "--out", str(tmp_path / "t")) == 0  # fmt: skip
    got = np.load(tmp_path / "t/tsea.npz")["scores"]
    sets = tsea.build_token_sets(Tokenizer.load(minfo.tokenizer), regexes={"spaced": "^ "})
    want = tsea.tsea(model, on_disk["W_dec"], LAYER, sets, n_null=0).scores
    assert got.shape == (1, sae.cfg.n_latents)
    np.testing.assert_allclose(got, want, atol=1e-6)

    # sae dashboard: exit 0, and each feature's maximum is the toy's own on those rows (the
    # larger decoder_init_norm above makes them large enough for the 5 decimals to tell)
    assert _cli("dashboard", "--model", str(m), "--sae", str(out), "--data",
                str(demo_data["translated"]), "--features", "0-7", "--rows", "16",
                "--batch-size", "8", "--k", "3", "--out", str(tmp_path / "d")) == 0  # fmt: skip
    dash = json.loads((tmp_path / "d/dashboards.json").read_text())
    assert [f["feature"] for f in dash["features"]] == list(range(8))
    assert dash["tokens_seen"] == rows.size
    toy_max = acts_ns[:, :8].max(0)
    relu_max = np.sqrt(toy_max)  # what a ReLU fallback would report
    shown = np.array([f["max_activation"] for f in dash["features"]])
    np.testing.assert_allclose(shown, toy_max, atol=ROUNDED, rtol=0)
    fires = toy_max > 0
    assert fires.sum() >= 4 and (np.abs(relu_max - toy_max)[fires] > 1e-3).all()
    for j, f in enumerate(dash["features"]):
        for c in f["contexts"]:
            n = c["row"] * rows.shape[1] + c["position"]
            assert abs(c["activation"] - acts_ns[n, j]) <= ROUNDED
