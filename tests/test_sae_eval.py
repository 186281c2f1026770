"""SAE evaluation and feature ablation.

Evaluation: SAELens' metrics (CE loss recovered, KL, explained variance, losses, L0, dead and
dense latents) against a straightforward reference on a transformers GPT-Neo whose `mlp.act`
forward hook returns the SAE's reconstruction (computed in numpy) or zeros; a perfect SAE scores
1 and KL 0, a zero SAE 0; the result lands beside the SAE with cfg.json still SAELens-loadable;
the CLI. Ablation: the edit's algebra (all features ablated leaves the error term + b_dec),
ablating nothing samples exactly what plain sampling does, random features are live and seeded,
the paired difference, the CLI; the same at several layers at once (a LayerEdits of ablations).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.checkpoint import save_model
from jaxlm.cli import main as jaxlm_main
from jaxlm.config import ModelConfig
from jaxlm.errors import UserError
from jaxlm.eval.artifacts import artifact_metrics
from jaxlm.hf import load_hf
from jaxlm.model import LayerEdits
from jaxlm.tokenizer import Tokenizer
from sae import ablate
from sae.ablate import FeatureAblation, ablation_report, paired_difference, pick_random
from sae.base import SAEConfig
from sae.evaluate import (
    eval_split,
    evaluate,
    evaluate_layers,
    firing_counts,
    read_rows,
    save_eval,
)
from sae.io import load_sae, save_sae
from sae.registry import create

torch = pytest.importorskip("torch")
from jaxlm.testing import random_hf_gpt_neo  # noqa: E402

LOSS_RTOL = 1e-4  # losses and KL (fp32 logits; never loosened)
SIMPLE_TOL = 1e-5  # simple ops on fp32 activations
LAYER, F, S = 1, 64, 128
# init_std 0.2: peaked next-token distributions and an MLP that moves them, so the scores'
# denominators (ablated - clean) are far from float noise
CFG = ModelConfig(vocab_size=400, d_model=32, n_layers=2, n_heads=4, d_mlp=F, max_positions=64,
                  init_std=0.2)  # fmt: skip


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(transformers GPTNeoForCausalLM, the same weights as a jaxlm model)."""
    d = tmp_path_factory.mktemp("hf_neo")
    ref = random_hf_gpt_neo(CFG, seed=3)
    with torch.no_grad():  # an MLP whose output dominates its residual stream: ablating it hurts
        ref.transformer.h[LAYER].mlp.c_proj.weight.mul_(4.0)
    ref.save_pretrained(d)
    return ref, load_hf(d)


def _identity_pair() -> np.ndarray:
    """[F, 2F] = [I, -I]: relu(x W) @ W.T = relu(x) - relu(-x) = x exactly."""
    return np.concatenate([np.eye(F), -np.eye(F)], 1).astype(np.float32)


def _sae(kind: str = "noisy", arch: str = "standard", seed: int = 0, **kw):
    """A standard SAE: `noisy` (the identity pair with independent noise on W_enc and W_dec, a
    threshold-like b_enc and some dead latents: imperfect, but far from useless), `perfect`
    (the identity pair) or `zero` (all weights 0)."""
    rng = np.random.default_rng(seed)
    E = _identity_pair()
    t = {"W_enc": E, "W_dec": E.T.copy(), "b_enc": np.zeros(S, np.float32),
         "b_dec": np.zeros(F, np.float32)}  # fmt: skip
    if kind == "noisy":
        t["W_enc"] = E + rng.normal(0, 0.05, E.shape).astype(np.float32)
        t["W_dec"] = (E.T + rng.normal(0, 0.05, E.T.shape)).astype(np.float32)
        t["b_enc"] = np.full(S, -0.05, np.float32)
        t["b_enc"][:8] = -1e3  # never fire
        t["b_dec"] = rng.normal(0, 0.02, F).astype(np.float32)
    elif kind == "zero":
        t = {k: np.zeros_like(v) for k, v in t.items()}
    sae = create(SAEConfig(architecture=arch, d_in=F, d_sae=S, **kw))
    if arch == "jumprelu":
        t["threshold"] = np.full(S, 0.02, np.float32)
    sae.load_tensors(t)
    return sae


def _np(sae) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in sae.inference_tensors()[1].items()}


# --- the reference ------------------------------------------------------------------------------


def _reference_batch(ref, sae, rows_bt1: np.ndarray) -> dict[str, np.ndarray]:
    """Per-token losses and KLs from transformers, the SAE written out in numpy (standard ReLU)."""
    fn = torch.nn.functional
    t = _np(sae)
    inputs = torch.tensor(rows_bt1[:, :-1], dtype=torch.long)
    targets = torch.tensor(rows_bt1[:, 1:], dtype=torch.long).reshape(-1)
    act = ref.transformer.h[LAYER].mlp.act
    seen = {}

    def run(hook):
        handle = act.register_forward_hook(hook)
        with torch.no_grad():
            logits = ref(inputs).logits
        handle.remove()
        return logits.reshape(-1, CFG.vocab_size)

    clean = run(lambda m, a, out: seen.__setitem__("h", out.numpy().copy()))
    h_nf = seen["h"].reshape(-1, F).astype(np.float64)
    acts_ns = np.maximum((h_nf - t["b_dec"]) @ t["W_enc"] + t["b_enc"], 0)
    recon_nf = acts_ns @ t["W_dec"] + t["b_dec"]
    as_out = lambda x, out: torch.from_numpy(x.reshape(out.shape).astype(np.float32))  # noqa: E731
    spliced = run(lambda m, a, out: as_out(recon_nf, out))
    zero = run(lambda m, a, out: torch.zeros_like(out))

    def kl(new):  # SAELens' _kl: kl_div(log q, p) summed over the vocabulary = KL(p || q)
        return fn.kl_div(fn.log_softmax(new, -1), fn.softmax(clean, -1), reduction="none").sum(-1)

    ce = lambda lg: fn.cross_entropy(lg, targets, reduction="none")  # noqa: E731
    return {"h": h_nf, "recon": recon_nf, "acts": acts_ns, "ce_clean": ce(clean).numpy(),
            "ce_sae": ce(spliced).numpy(), "ce_zero": ce(zero).numpy(),
            "kl_sae": kl(spliced).numpy(), "kl_zero": kl(zero).numpy()}  # fmt: skip


def _reference_metrics(parts: list[dict]) -> dict:
    r = {k: np.concatenate([p[k] for p in parts]).astype(np.float64) for k in parts[0]}
    m = {k: r[k].mean() for k in ("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero")}
    h, fired = r["h"], r["acts"] > 0
    return {
        "ce_loss_without_sae": m["ce_clean"],
        "ce_loss_with_sae": m["ce_sae"],
        "ce_loss_with_ablation": m["ce_zero"],
        "ce_loss_score": 1 - (m["ce_sae"] - m["ce_clean"]) / (m["ce_zero"] - m["ce_clean"]),
        "kl_div_with_sae": m["kl_sae"],
        "kl_div_with_ablation": m["kl_zero"],
        "explained_variance": 1
        - np.square(h - r["recon"]).sum(1).mean() / np.square(h - h.mean(0)).sum(1).mean(),
        "l0": fired.sum(1).mean(),
        "dead_fraction": (fired.sum(0) == 0).mean(),
        "dense_fraction": (fired.mean(0) > 0.1).mean(),
        "tokens": len(h),
    }


# --- evaluation ---------------------------------------------------------------------------------


def test_metrics_match_a_transformers_reference(hf_pair, demo_data):
    ref, model = hf_pair
    sae = _sae("noisy")
    sources = [demo_data["translated"], demo_data["native"]]
    got = evaluate(model, sae, LAYER, sources, rows=13, batch_size=5)  # batches of 5, 5, 3
    parts = {}
    for name, d in zip(("data_translated", "data_native"), sources, strict=True):
        batches = read_rows(d, split="validation", max_rows=13, batch_size=5)
        parts[name] = [_reference_batch(ref, sae, b) for b in batches]
    parts["pooled"] = parts["data_translated"] + parts["data_native"]
    for name, want_parts in parts.items():
        have = got["pooled"] if name == "pooled" else got["sources"][name]
        want = _reference_metrics(want_parts)
        assert have["tokens"] == want["tokens"]
        for k in ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation",
                  "kl_div_with_sae", "kl_div_with_ablation"):  # fmt: skip
            assert have[k] == pytest.approx(want[k], rel=LOSS_RTOL), (name, k)
        # the score's error, propagated from 1e-4 relative on each loss
        c = want
        bound = (
            LOSS_RTOL
            * (c["ce_loss_with_sae"] + c["ce_loss_with_ablation"])
            / abs(c["ce_loss_with_ablation"] - c["ce_loss_without_sae"])
        )
        assert have["ce_loss_score"] == pytest.approx(want["ce_loss_score"], abs=bound)
        assert have["explained_variance"] == pytest.approx(want["explained_variance"], abs=1e-4)
        assert have["l0"] == pytest.approx(want["l0"], abs=1e-2)
        assert have["dead_fraction"] == want["dead_fraction"] >= 8 / S
        assert have["dense_fraction"] == pytest.approx(want["dense_fraction"], abs=1 / S)
    pooled = got["pooled"]
    # a useful but imperfect SAE, on a model whose MLP matters: the test discriminates
    assert 0.2 < pooled["explained_variance"] < 0.95 and 0 < pooled["kl_div_score"] < 1
    assert abs(pooled["ce_loss_with_ablation"] - pooled["ce_loss_without_sae"]) > 0.05
    assert got["sources"]["data_native"]["split"] == "validation"
    assert got["sources"]["data_native"]["rows"] == 10 and pooled["rows"] == 13 + 10  # all 10
    assert pooled["kl_div_score"] == pytest.approx(
        1 - pooled["kl_div_with_sae"] / pooled["kl_div_with_ablation"]
    )


def test_several_saes_in_one_pass_are_each_evaluated_as_alone(hf_pair, demo_data):
    """`evaluate_layers` shares each batch's clean forward among SAEs at different layers and
    starts each edited forward at its SAE's layer; every result is what `evaluate` gives that SAE
    alone (same rows, same metrics, to float rounding)."""
    _, model = hf_pair
    pairs = [(_sae("noisy", seed=1), 0), (_sae("noisy"), LAYER), (_sae("zero"), LAYER)]
    sources = [demo_data["translated"], demo_data["native"]]
    together = evaluate_layers(model, pairs, sources, rows=13, batch_size=5)
    for (sae, layer), got in zip(pairs, together, strict=True):
        alone = evaluate(model, sae, layer, sources, rows=13, batch_size=5)
        assert got["layer"] == layer
        for name in ("data_translated", "data_native", "pooled"):
            have = got["pooled"] if name == "pooled" else got["sources"][name]
            want = alone["pooled"] if name == "pooled" else alone["sources"][name]
            assert have.keys() == want.keys()
            for k, v in want.items():
                if isinstance(v, float) or (isinstance(v, list) and v and isinstance(v[0], float)):
                    assert have[k] == pytest.approx(v, rel=1e-6, abs=1e-7), (layer, name, k)
                else:
                    assert have[k] == v, (layer, name, k)
    # the layers differ: the same kind of SAE at layer 0 and LAYER scores differently
    assert (
        together[0]["pooled"]["ce_loss_with_ablation"]
        != together[1]["pooled"]["ce_loss_with_ablation"]
    )


def test_perfect_sae_recovers_everything_and_zero_sae_nothing(hf_pair, demo_data):
    from jaxlm.train.sections import DataSource

    _, model = hf_pair
    src = [DataSource(str(demo_data["native"]))]  # as the trainers' data section holds them
    perfect = evaluate(model, _sae("perfect"), LAYER, src, rows=8, batch_size=8)["pooled"]
    assert perfect["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["ce_loss_with_sae"] == pytest.approx(perfect["ce_loss_without_sae"], rel=1e-7)
    assert abs(perfect["kl_div_with_sae"]) < 1e-7 and perfect["kl_div_score"] == pytest.approx(1)
    assert perfect["explained_variance"] == pytest.approx(1.0, abs=SIMPLE_TOL)
    assert perfect["mse"] < 1e-10
    zero = evaluate(model, _sae("zero"), LAYER, src, rows=8, batch_size=8)["pooled"]
    assert zero["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl_div_with_sae"] == pytest.approx(zero["kl_div_with_ablation"], rel=1e-6)
    assert zero["l0"] == 0 and zero["dead_fraction"] == 1 and zero["dense_fraction"] == 0
    assert zero["explained_variance"] < 0  # predicting 0 is worse than predicting the mean
    for m, want in ((perfect, 1.0), (zero, 0.0)):
        assert m["ce_loss_score_ci95"] == pytest.approx([want, want], abs=1e-6)


def test_ce_score_interval_is_a_row_bootstrap_and_flags_a_denominator_not_above_zero():
    from sae.evaluate import ce_score_interval

    rng = np.random.default_rng(0)
    T = 16  # tokens per row
    clean = rng.uniform(20, 30, 200)
    # well conditioned: ablation costs ~8 per row, the SAE ~1: score ~0.875
    rows = np.stack([clean, clean + rng.normal(1, 0.3, 200), clean + rng.normal(8, 1, 200)], 1)
    got = ce_score_interval(rows, 200 * T)
    point = 1 - (rows[:, 1] - rows[:, 0]).sum() / (rows[:, 2] - rows[:, 0]).sum()
    lo, hi = got["ce_loss_score_ci95"]
    assert lo < point < hi and hi - lo < 0.05
    assert got["ce_loss_score_measurable"]
    assert got["ablation_gain_ci95"][0] == pytest.approx(8 / T, rel=0.1)
    # ablation helps on average (as the demo's CPT model on translated rows): not measurable
    bad = np.stack([clean, clean - 0.2, clean + rng.normal(-0.8, 1, 200)], 1)
    got = ce_score_interval(bad, 200 * T)
    assert not got["ce_loss_score_measurable"] and got["ablation_gain_ci95"][1] < 0.05
    assert ce_score_interval(np.zeros((0, 3)), 0)["ce_loss_score_measurable"] is False


def test_split_falls_back_to_train_and_says_so(demo_data, tmp_path):
    stories = [json.loads(x) for x in (demo_data["dir"] / "native.jsonl").read_text().splitlines()]
    (tmp_path / "few.jsonl").write_text(
        "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in stories[:20])
    )
    assert jaxlm_main(["data", "prepare", "--input", str(tmp_path / "few.jsonl"), "--tokenizer",
                       str(demo_data["tok"]), "--seq-len", "32", "--val-fraction", "0",
                       "--workers", "1", "--out", str(tmp_path / "d")]) == 0  # fmt: skip
    split, note = eval_split(tmp_path / "d")
    assert split == "train" and "no validation rows" in note
    assert eval_split(demo_data["native"]) == ("validation", None)
    with pytest.raises(UserError, match="no rows in split 'test'"):
        eval_split(tmp_path / "d", "test")


def test_rows_are_a_seeded_sample_of_the_split(demo_data):
    d = demo_data["translated"]
    a = np.concatenate(list(read_rows(d, split="validation", max_rows=7, batch_size=3)))
    b = np.concatenate(list(read_rows(d, split="validation", max_rows=7, batch_size=7)))
    c = np.concatenate(list(read_rows(d, split="validation", max_rows=7, batch_size=3, seed=1)))
    assert a.shape == (7, 33) and np.array_equal(a, b) and not np.array_equal(a, c)


def test_result_is_saved_beside_the_sae_and_sae_lens_still_loads_it(tmp_path):
    from tests.helpers_sae_lens import sae_lens

    sae = _sae("noisy")
    save_sae(tmp_path, sae, layer=LAYER, model_path="/m", extra={"steps": 3})
    before = json.loads((tmp_path / "cfg.json").read_text())
    result = {"layer": LAYER, "pooled": {"ce_loss_score": 0.9, "kl_div_score": None}}
    save_eval(tmp_path, result)
    assert json.loads((tmp_path / "eval.json").read_text()) == result
    after = json.loads((tmp_path / "cfg.json").read_text())
    assert after["jaxlm"].pop("eval") == result and after == before  # only jaxlm.eval is new
    loaded, info = load_sae(tmp_path)
    assert info.layer == LAYER and np.array_equal(loaded.W_dec_sf[...], sae.W_dec_sf[...])
    sae_lens()
    from sae_lens.saes.sae import SAE as SAELensSAE

    assert SAELensSAE.load_from_disk(str(tmp_path)).cfg.d_sae == S


# --- feature ablation ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_ablation_removes_exactly_the_features_decoded_part(arch):
    sae = _sae("noisy", arch)
    t = _np(sae)
    h_btf = np.random.default_rng(1).normal(0, 1, (2, 5, F)).astype(np.float32)
    acts = np.asarray(sae.encode(jnp.asarray(h_btf.reshape(-1, F))), np.float64)  # [N, S]
    h = h_btf.reshape(-1, F).astype(np.float64)
    feats = [9, 17, 40]
    cases = {
        FeatureAblation(sae, LAYER, range(S)): h - (acts @ t["W_dec"] + t["b_dec"]) + t["b_dec"],
        FeatureAblation(sae, LAYER, feats): h - acts[:, feats] @ t["W_dec"][feats],
        FeatureAblation(sae, LAYER, feats, mode="clamp", value=2.5): h
        + (2.5 - acts[:, feats]) @ t["W_dec"][feats],
    }
    for edit, want in cases.items():
        got = np.asarray(edit(jnp.asarray(h_btf))).reshape(-1, F)
        np.testing.assert_allclose(got, want, atol=SIMPLE_TOL, rtol=SIMPLE_TOL)
    assert np.array_equal(np.asarray(FeatureAblation(sae, LAYER, [])(jnp.asarray(h_btf))), h_btf)
    with pytest.raises(UserError, match="not latents"):
        FeatureAblation(sae, LAYER, [S])


def test_all_features_ablated_leaves_error_plus_b_dec_in_the_model(hf_pair):
    """Through the whole forward: transformers with a hook returning (h - recon) + b_dec."""
    ref, model = hf_pair
    sae = _sae("noisy")
    t = _np(sae)
    ids = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 24))
    act = ref.transformer.h[LAYER].mlp.act

    def hook(m, a, out):
        h = out.numpy().reshape(-1, F).astype(np.float64)
        recon = np.maximum((h - t["b_dec"]) @ t["W_enc"] + t["b_enc"], 0) @ t["W_dec"] + t["b_dec"]
        return torch.from_numpy((h - recon + t["b_dec"]).reshape(out.shape).astype(np.float32))

    handle = act.register_forward_hook(hook)
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    handle.remove()
    got = np.asarray(model(jnp.asarray(ids), edit=FeatureAblation(sae, LAYER, range(S))))
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert np.abs(got - np.asarray(model(jnp.asarray(ids)))).max() > 1e-2  # the edit matters


def test_ablating_nothing_samples_exactly_what_plain_sampling_does(hf_pair, demo_data):
    """`ablation_report`'s baseline is plain sampling (same prompts, seeds, batches); with nothing
    ablated its edited stories are the same tokens, with every feature ablated they are not."""
    from jaxlm.eval.samples import DEMO_SAMPLING, sample_stories

    _, model = hf_pair
    sae, tok = _sae("noisy"), Tokenizer.load(demo_data["tok"])
    kw = dict(n=4, prompts=["كان", "في يوم"], max_new_tokens=10, batch_size=2, resamples=20)
    rows, report = ablation_report(model, tok, FeatureAblation(sae, LAYER, []), **kw)
    plain = sample_stories(model, tok, 4, ["كان", "في يوم"], max_new_tokens=10, batch_size=2,
                           sampling=DEMO_SAMPLING)  # fmt: skip
    assert [r["baseline"] for r in rows] == [r["ablated"] for r in rows] == plain
    assert [(r["prompt"], r["seed"]) for r in rows] == [("كان", 0), ("في يوم", 0), ("كان", 1),
                                                        ("في يوم", 1)]  # fmt: skip
    assert report["ablated"]["metrics"] == report["baseline"]["metrics"]
    rows, _ = ablation_report(model, tok, FeatureAblation(sae, LAYER, range(S)), **kw)
    assert [r["baseline"] for r in rows] == plain
    assert [r["ablated"] for r in rows] != plain


def test_random_features_are_live_and_seeded(hf_pair, demo_data, tmp_path):
    _, model = hf_pair
    sae = _sae("noisy")
    rows = read_rows(demo_data["native"], split="validation", max_rows=10, batch_size=4)
    counts, tokens = firing_counts(model, sae, LAYER, rows)
    assert tokens == 320 and (counts[:8] == 0).all()  # the latents that cannot fire
    live = np.flatnonzero(counts)
    want = _reference_metrics(
        [_reference_batch(hf_pair[0], sae, b) for b in
         read_rows(demo_data["native"], split="validation", max_rows=10, batch_size=10)]
    )  # fmt: skip
    assert 1 - len(live) / S == want["dead_fraction"]
    picks = {tuple(pick_random(live, 5, seed)) for seed in range(4)}
    assert len(picks) > 1 and all(set(p) <= set(live.tolist()) for p in picks)
    assert pick_random(live, 5, 7) == pick_random(live, 5, 7)
    with pytest.raises(UserError, match="live features"):
        pick_random(live, len(live) + 1, 0)
    # from the training's log10 firing frequencies: never firing reads log10(1e-10) = -10
    freq = np.where(np.arange(S) % 3 == 0, 0.0, 1e-6).astype(np.float32)
    save_sae(tmp_path, sae, layer=LAYER, log_sparsity_s=np.log10(freq + 1e-10))
    assert ablate.live_from_sparsity(tmp_path).tolist() == [i for i in range(S) if i % 3]


def test_paired_difference_is_the_difference_of_the_pooled_rates():
    a = ['قال توم، "مرحبا"', "ليلي وسلمى", "لا أسماء"]
    b = ["قالت سلمى: «مرحبا»", "ليلي ويوسف", "لا أسماء"]
    ra, rb = artifact_metrics(a, resamples=50), artifact_metrics(b, resamples=50)
    diff = paired_difference(ra["per_story"], rb["per_story"], resamples=200)
    for k in ("english_name_rate", "english_dialogue_share"):
        want = ra["metrics"][k]["value"] - rb["metrics"][k]["value"]
        assert diff[k]["value"] == pytest.approx(want) and want > 0
        lo, hi = diff[k]["ci95"]
        assert lo <= want <= hi and diff[k]["n"] == 3
    same = paired_difference(ra["per_story"], ra["per_story"], resamples=50)
    assert same["english_name_rate"] == {"value": 0.0, "ci95": [0.0, 0.0], "n": 3}
    none = paired_difference([{"english_mentions": 0, "arabic_mentions": 0, "english_turns": 0,
                               "arabic_turns": 0}] * 2, rb["per_story"][:2])  # fmt: skip
    assert none["english_name_rate"]["value"] is None


# --- CLI ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(hf_pair, demo_data, tmp_path_factory):
    """A saved model (with the demo tokenizer) and a saved SAE that names it and its layer."""
    d = tmp_path_factory.mktemp("sae_eval_cli")
    save_model(d / "m", hf_pair[1], tokenizer=str(demo_data["tok"]))
    save_sae(d / "sae", _sae("noisy"), layer=LAYER, model_path=str(d / "m"))
    return d


def _sae_cli(argv: list[str]) -> int:
    return jaxlm_main(["sae", *argv])


def test_eval_cli_pulse(saved, demo_data, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["eval", "--sae", str(saved / "sae"), "--data", str(demo_data["translated"]),
            "--data", str(demo_data["native"]), "--rows", "6", "--batch-size", "3",
            "--out", str(out)]  # fmt: skip
    assert _sae_cli(argv) == 0  # the model: the one the SAE's cfg.json records
    result = json.loads(out.read_text())
    assert set(result["sources"]) == {"data_translated", "data_native"}
    assert result["pooled"]["rows"] == 12 and result["model"] == str(saved / "m")
    assert json.loads(capsys.readouterr().out)["ce_loss_score"] == result["pooled"]["ce_loss_score"]
    assert json.loads((saved / "sae/eval.json").read_text()) == result
    assert json.loads((saved / "sae/cfg.json").read_text())["jaxlm"]["eval"] == result


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--rows", "0"], "--rows 0"),
        (["--layer", "5"], "layer 5"),
        (["--data", "/nonexistent"], "not a prepared DATADIR"),
        (["--split", "test"], "no rows in split 'test'"),
    ],
)
def test_eval_cli_bad_input_is_one_line(saved, demo_data, tmp_path, capsys, flags, needle):
    data = [] if "--data" in flags else ["--data", str(demo_data["native"])]
    argv = ["eval", "--sae", str(saved / "sae"), *data, *flags, "--out", str(tmp_path / "e.json")]
    assert _sae_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_name_slot_logit_differences_are_those_of_the_full_forwards(hf_pair, demo_data):
    """The ablation's logit differences at the name contexts read the clean residual and the
    edited one (run from the first edited layer's input): the same as full forwards of the model
    without and with the edit, at attribute's contexts (`find_contexts`, `logit_difference`)."""
    from sae.analysis import attribution as at

    _, model = hf_pair
    tok = Tokenizer.load(demo_data["tok"])
    tokens = np.concatenate([
        next(read_rows(demo_data[d], split="train", max_rows=24, batch_size=24))[:, :-1]
        for d in ("translated", "native")
    ])  # fmt: skip
    sae = _sae("noisy")
    for edit in (FeatureAblation(sae, LAYER, list(range(S))),
                 LayerEdits([FeatureAblation(_sae("noisy", seed=1), 0, list(range(S))),
                             FeatureAblation(sae, LAYER, list(range(S)))])):  # fmt: skip
        label, base, abl, n = ablate.name_slot_logit_diffs(model, tok, edit, [tokens])
        contrast = at.name_contrast(tok, at.demo_name_lists())
        ctx = at.find_contexts(tokens, at.token_bytes(tok), contrast)
        assert n == 48 and len(ctx) == len(label) > 5
        ro = at.Readout.of(model, 0)
        u_cd = at.context_directions(ro.directions(contrast), ctx.form)
        for e, got in ((None, base), (edit, abl)):
            x_btd = np.asarray(model.residual(jnp.asarray(tokens), edit=e), np.float64)
            want = at.logit_difference(ro, u_cd, x_btd[ctx.row, ctx.pos])
            np.testing.assert_allclose(got, want, atol=SIMPLE_TOL, rtol=SIMPLE_TOL)
        assert np.abs(abl - base).max() > 1e-2  # the edit moves them


def test_ablate_cli_pulse(saved, demo_data, tmp_path, capsys):
    out = tmp_path / "samples.jsonl"
    common = ["ablate", "--model", str(saved / "m"), "--sae", str(saved / "sae"), "--n", "4",
              "--max-new-tokens", "6", "--batch-size", "2", "--resamples", "20"]  # fmt: skip
    data = ["--data", str(demo_data["translated"]), "--data", str(demo_data["native"]),
            "--split", "train", "--logit-rows", "24"]  # fmt: skip
    argv = [*common, "--features", "0,1,2,3", *data, "--out", str(out)]  # never fire
    assert _sae_cli(argv) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["seed"] for r in rows] == [0, 0, 1, 1]
    # removing features that are 0 everywhere changes nothing: the edit is the only difference
    assert all(r["ablated"] == r["baseline"] for r in rows)
    report = json.loads((tmp_path / "samples.artifacts.json").read_text())
    assert report["features"] == [0, 1, 2, 3] and report["selection"] == {"how": "given"}
    for side in ("ablated", "baseline"):
        assert report[side]["stories"] == 4 and "english_name_rate" in report[side]["metrics"]
    assert set(report["difference"]) == {"english_name_rate", "english_dialogue_share"}
    # each story keeps what the rates pool, so another run's stories can pair with these
    for side in ("ablated", "baseline"):
        for k in ("english_mentions", "arabic_mentions", "english_turns", "arabic_turns"):
            assert sum(r["counts"][side][k] for r in rows) == report[side]["counts"][k]
    line = json.loads(capsys.readouterr().out)
    assert line["report"] == str(tmp_path / "samples.artifacts.json")
    # the name-slot logit difference on the --data rows: unmoved by latents that never fire
    ld = report["name_logit_diff"]
    assert ld["rows"] == 48 and ld["contexts"]["english"] > 5 and ld["contexts"]["arabic"] > 5
    assert ld["baseline"]["value"] == pytest.approx(ld["ablated"]["value"], abs=1e-5)
    assert abs(ld["difference"]["value"]) < 1e-5 and line["name_logit_diff"] == ld["difference"]
    assert ld["difference"]["n"] == ld["contexts"]["english"] + ld["contexts"]["arabic"]


def test_ablate_cli_reads_the_baseline_of_a_run_that_sampled_the_same_stories(
    saved, tmp_path, capsys
):
    """--baseline-from: the unedited stories are the earlier run's, exactly what sampling again
    gives; a run with other sampling flags (another seed, n, model) is refused in one line."""
    common = ["ablate", "--model", str(saved / "m"), "--sae", str(saved / "sae"), "--n", "4",
              "--max-new-tokens", "8", "--batch-size", "2", "--resamples", "20"]  # fmt: skip
    first = tmp_path / "top.json"
    assert _sae_cli([*common, "--features", "5,9", "--out", str(tmp_path / "top.jsonl"),
                     "--report", str(first)]) == 0  # fmt: skip
    runs = {}
    other_spelling = ["--model", str(saved / "m" / ".." / "m")]  # the same model, spelt otherwise
    for name, extra in (
        ("fresh", []),
        ("reused", [*other_spelling, "--baseline-from", str(first)]),
    ):
        out = tmp_path / f"{name}.jsonl"
        assert _sae_cli([*common, "--features", "1,2,3", *extra, "--out", str(out)]) == 0
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        report = json.loads(out.with_suffix(".artifacts.json").read_text())
        runs[name] = rows, report
    (fresh, fresh_report), (reused, reused_report) = runs["fresh"], runs["reused"]
    assert [r["baseline"] for r in reused] == [r["baseline"] for r in fresh]
    assert [r["ablated"] for r in reused] == [r["ablated"] for r in fresh]
    assert reused_report["baseline_from"] == str(first.resolve())
    assert reused_report["model"] == str((saved / "m").resolve())  # as given or not, alike
    assert "baseline_from" not in fresh_report
    assert reused_report["baseline"] == fresh_report["baseline"]
    capsys.readouterr()
    for flags, needle in ((["--sample-seed", "1"], "seed=0, this run with seed=1"),
                          (["--batch-size", "4"], "batch_size=2, this run with batch_size=4"),
                          (["--n", "3"], "n=4, this run with n=3")):  # fmt: skip
        argv = [*common, *flags, "--features", "1,2,3", "--baseline-from", str(first),
                "--out", str(tmp_path / "x.jsonl")]  # fmt: skip
        assert _sae_cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "--baseline-from" in err, err
    # the same prompts file, rewritten since: its stories began elsewhere
    rows = [json.loads(x) for x in (tmp_path / "top.jsonl").read_text().splitlines()]
    (tmp_path / "top.jsonl").write_text(
        "".join(
            json.dumps({**r, "prompt": "x" if r["i"] == 2 else r["prompt"]}) + "\n" for r in rows
        )
    )
    assert _sae_cli([*common, "--features", "1,2,3", "--baseline-from", str(first),
                     "--out", str(tmp_path / "x.jsonl")]) == 2  # fmt: skip
    assert "its story 2 began from another prompt" in capsys.readouterr().err
    (tmp_path / "top.jsonl").write_text("")  # its stories gone: refused, not sampled anew
    assert _sae_cli([*common, "--features", "1,2,3", "--baseline-from", str(first),
                     "--out", str(tmp_path / "x.jsonl")]) == 2  # fmt: skip
    assert "are not the 4 its report names" in capsys.readouterr().err


def _ablated_rows(names_ablated: list[tuple[int, int]], baseline: str = "b") -> list[dict]:
    """JSONL rows of `sae ablate` with these (English, Arabic) mentions in the ablated stories."""
    return [{"i": i, "prompt": "", "seed": i // 2, "ablated": f"a{i}", "baseline": baseline,
             "counts": {"ablated": {"english_mentions": e, "arabic_mentions": a,
                                    "english_turns": 0, "arabic_turns": 0}}}
            for i, (e, a) in enumerate(names_ablated)]  # fmt: skip


def test_two_ablations_pair_story_by_story_only_when_they_sampled_the_same_stories(tmp_path):
    from jaxlm.pipeline.method import ablation_summary
    from sae.ablate import paired_difference, paired_runs

    top = _ablated_rows([(1, 3), (0, 2), (2, 2), (1, 1)])
    rnd = _ablated_rows([(3, 1), (2, 0), (2, 1), (2, 1)])
    got = paired_runs(top, rnd, resamples=200, seed=5)["english_name_rate"]
    per = [[r["counts"]["ablated"] for r in rows] for rows in (top, rnd)]
    want = paired_difference(*per, resamples=200, seed=5)
    assert got == want["english_name_rate"]
    assert got["value"] == pytest.approx(4 / 12 - 9 / 12) and got["n"] == 4
    for other, needle in ((rnd[:3], "4 stories against 3"),
                          (_ablated_rows([(3, 1)] * 4, baseline="c"), "another baseline"),
                          ([{k: v for k, v in r.items() if k != "counts"} for r in rnd],
                           "no per-story counts")):  # fmt: skip
        with pytest.raises(ValueError, match=needle):
            paired_runs(top, other)
    # the pipeline's summary reads both runs' files: the paired difference and the mentions
    side = lambda e, a: {"stories": 4, "metrics": {"english_name_rate": {"value": e / (e + a)}},  # noqa: E731
                         "counts": {"english_mentions": e, "arabic_mentions": a},
                         "bootstrap": {"resamples": 200, "seed": 5}}  # fmt: skip
    for name, rows, abl in (("top", top, side(4, 8)), ("random", rnd, side(9, 3))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        report = {"features": [1], "baseline": side(10, 2), "ablated": abl, "difference": {}}
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
    summary = ablation_summary(tmp_path, [1])
    assert summary["difference_top_vs_random"] == got
    assert summary["name_mentions"] == {"stories": 4, "none": {"english": 10, "arabic": 2},
                                        "top": {"english": 4, "arabic": 8},
                                        "random": {"english": 9, "arabic": 3}}  # fmt: skip
    # runs from before the rows kept counts: no paired figure (the report falls back to MOVER)
    stripped = [{k: v for k, v in r.items() if k != "counts"} for r in top]
    (tmp_path / "top.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stripped))
    assert ablation_summary(tmp_path, [1])["difference_top_vs_random"] is None


def test_ablate_cli_draws_random_live_features(hf_pair, saved, demo_data):
    """`--random K --data DIR`: K latents active on the rows, seeded (no sampling here)."""
    import argparse

    from sae.eval_cli import _features

    sae, info = load_sae(saved / "sae")
    model = hf_pair[1]  # the saved model's weights
    args = argparse.Namespace(features=None, random=[3], seed=5, data=[str(demo_data["native"])],
                              split="validation", rows=8)  # fmt: skip
    feats, how = _features(args, model, sae, info, LAYER)
    assert len(feats) == 3 and min(feats) >= 8  # latents 0..7 never fire
    assert how["how"] == "random live" and how["n_live"] == S - 8 and how["seed"] == 5
    assert _features(args, model, sae, info, LAYER)[0] == feats


def test_random_counts_are_one_for_every_sae_or_one_per_sae():
    from sae.ablate import parse_counts

    assert parse_counts("4", 3) == [4, 4, 4]
    assert parse_counts("4,1,2", 3) == [4, 1, 2]
    with pytest.raises(UserError, match="2 counts for 3 SAEs"):
        parse_counts("4,1", 3)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--features", "3,999"], "[999] are not latents"),
        (["--features", "3,x"], "comma-separated"),
        (["--features", "3", "--mode", "clamp"], "--value goes with --mode clamp"),
        (["--random", "2"], "sparsity.safetensors: missing"),
    ],
)
def test_ablate_cli_bad_input_is_one_line(saved, tmp_path, capsys, flags, needle):
    argv = ["ablate", "--sae", str(saved / "sae"), "--n", "2", "--max-new-tokens", "4", *flags,
            "--out", str(tmp_path / "s.jsonl")]  # fmt: skip
    assert _sae_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


# --- several layers at once ---------------------------------------------------------------------


def test_ablations_at_every_layer_match_transformers_hooks_at_both(hf_pair):
    """Every feature of one SAE per layer ablated in one forward: transformers with a hook on
    each layer's `mlp.act` returning that layer's (h - recon) + b_dec. Empty masks at every
    layer leave the logits bit for bit."""
    ref, model = hf_pair
    saes = {0: _sae("noisy", seed=1), 1: _sae("noisy")}
    ids = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 24))

    def hook(t):
        def edit(m, a, out):
            h = out.numpy().reshape(-1, F).astype(np.float64)
            acts = np.maximum((h - t["b_dec"]) @ t["W_enc"] + t["b_enc"], 0)
            kept = h - (acts @ t["W_dec"] + t["b_dec"]) + t["b_dec"]
            return torch.from_numpy(kept.reshape(out.shape).astype(np.float32))

        return edit

    handles = [ref.transformer.h[i].mlp.act.register_forward_hook(hook(_np(sae)))
               for i, sae in saes.items()]  # fmt: skip
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    for h in handles:
        h.remove()
    every = LayerEdits([FeatureAblation(sae, i, range(S)) for i, sae in saes.items()])
    got = np.asarray(model(jnp.asarray(ids), edit=every))
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    last = np.asarray(model(jnp.asarray(ids), edit=FeatureAblation(saes[1], 1, range(S))))
    assert np.abs(got - last).max() > 1e-2  # layer 0's ablation matters too
    nothing = LayerEdits([FeatureAblation(sae, i, []) for i, sae in saes.items()])
    plain = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_array_equal(np.asarray(model(jnp.asarray(ids), edit=nothing)), plain)


def test_ablating_nothing_at_every_layer_samples_exactly_what_plain_sampling_does(
    hf_pair, demo_data
):
    from jaxlm.eval.samples import DEMO_SAMPLING, sample_stories

    _, model = hf_pair
    tok = Tokenizer.load(demo_data["tok"])
    saes = {0: _sae("noisy", seed=1), 1: _sae("noisy")}
    kw = dict(n=4, prompts=["كان", "في يوم"], max_new_tokens=10, batch_size=2, resamples=20)
    nothing = LayerEdits([FeatureAblation(sae, i, []) for i, sae in saes.items()])
    rows, report = ablation_report(model, tok, nothing, **kw)
    plain = sample_stories(model, tok, 4, ["كان", "في يوم"], max_new_tokens=10, batch_size=2,
                           sampling=DEMO_SAMPLING)  # fmt: skip
    assert [r["baseline"] for r in rows] == [r["ablated"] for r in rows] == plain
    assert report["ablated"]["metrics"] == report["baseline"]["metrics"]
    every = LayerEdits([FeatureAblation(sae, i, range(S)) for i, sae in saes.items()])
    rows, _ = ablation_report(model, tok, every, **kw)
    assert [r["baseline"] for r in rows] == plain
    assert [r["ablated"] for r in rows] != plain


@pytest.fixture(scope="module")
def layered(saved):
    """Two SAEs as `jaxlm sae train --layers 0,1` lays them out: DIR/layer-0, DIR/layer-1."""
    for layer, seed in ((0, 1), (1, 0)):
        save_sae(saved / "layers" / f"layer-{layer}", _sae("noisy", seed=seed), layer=layer,
                 model_path=str(saved / "m"))  # fmt: skip
    return saved / "layers"


def test_ablate_cli_pulse_with_two_saes(saved, layered, demo_data, tmp_path, capsys):
    out = tmp_path / "samples.jsonl"
    argv = ["ablate", "--sae", str(layered / "layer-0"), "--sae", str(saved / "sae"),
            "--features", "0,1,2", "--features", "3,4", "--n", "4", "--max-new-tokens", "6",
            "--batch-size", "2", "--resamples", "20", "--data", str(demo_data["translated"]),
            "--data", str(demo_data["native"]), "--split", "train", "--logit-rows", "24",
            "--out", str(out)]  # fmt: skip
    assert _sae_cli(argv) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4 and all(r["ablated"] == r["baseline"] for r in rows)  # never fire
    report = json.loads((tmp_path / "samples.artifacts.json").read_text())
    assert report["sae"] == [str(layered / "layer-0"), str(saved / "sae")]
    assert report["layers"] == [0, 1] and "layer" not in report
    assert report["features"] == {"0": [0, 1, 2], "1": [3, 4]}
    assert report["selection"] == {"0": {"how": "given"}, "1": {"how": "given"}}
    assert set(report["difference"]) == {"english_name_rate", "english_dialogue_share"}
    for side in ("ablated", "baseline"):
        assert report[side]["stories"] == 4
    ld = report["name_logit_diff"]
    assert ld["rows"] == 48 and ld["contexts"]["english"] > 5 and ld["contexts"]["arabic"] > 5
    assert abs(ld["difference"]["value"]) < 1e-5
    line = json.loads(capsys.readouterr().out)
    assert line["features"] == report["features"] and line["name_logit_diff"] == ld["difference"]


def test_ablate_cli_draws_random_live_features_per_layer(hf_pair, layered, demo_data):
    """`--random 3,2` with a directory of layer-N/ SAEs: that many live latents of each SAE at its
    layer (one count per SAE, as the pipeline matches each layer's top features), SAE i drawing
    with seed + i; the edit is one FeatureAblation per layer."""
    import argparse

    from sae.eval_cli import _ablation, _load_saes, _sae_dirs

    args = argparse.Namespace(model=None, layer=None, features=None, random=[3, 2], seed=5,
                              data=[str(demo_data["native"])], split="validation", rows=8,
                              mode="zero", value=None)  # fmt: skip
    paths = _sae_dirs([str(layered)])
    assert paths == [str(layered / "layer-0"), str(layered / "layer-1")]
    model, _, saes = _load_saes(args, paths)
    edit, which = _ablation(args, model, saes)
    assert isinstance(edit, LayerEdits) and edit.layers == (0, 1) and which["layers"] == [0, 1]
    rows = lambda: read_rows(demo_data["native"], split="validation", max_rows=8, batch_size=8)  # noqa: E731
    for i, (_, sae, _, layer) in enumerate(saes):
        feats, how = which["features"][str(layer)], which["selection"][str(layer)]
        live = np.flatnonzero(firing_counts(hf_pair[1], sae, layer, rows())[0])
        assert len(feats) == [3, 2][i] and set(feats) <= set(live.tolist())
        assert how["seed"] == 5 + i and how["n_live"] == len(live) and how["k"] == [3, 2][i]
        assert np.flatnonzero(np.asarray(edit.edits[i].mask_s[...])).tolist() == feats
    assert _ablation(args, model, saes)[1] == which  # seeded


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--features", "1"], "1 --features for 2 SAEs"),
        (["--features", "1", "--features", "2", "--layer", "1"], "--layer 1 goes with one SAE"),
        (["--features", "1", "--features", "999"], "layer-1: --features: [999] are not latents"),
        (["--random", "1,2,3"], "--random 1,2,3: 3 counts for 2 SAEs"),
        (["--random", "2,x"], "--random '2,x': expected K or comma-separated counts"),
    ],
)
def test_ablate_cli_several_saes_bad_input_is_one_line(layered, tmp_path, capsys, flags, needle):
    argv = ["ablate", "--sae", str(layered), "--n", "2", "--max-new-tokens", "4", *flags,
            "--out", str(tmp_path / "s.jsonl")]  # fmt: skip
    assert _sae_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    argv = ["ablate", "--sae", str(layered / "layer-1"), "--sae", str(layered / "layer-1"),
            "--random", "2", "--out", str(tmp_path / "s.jsonl")]  # fmt: skip
    assert _sae_cli(argv) == 2
    assert "several SAEs read layer 1" in capsys.readouterr().err
