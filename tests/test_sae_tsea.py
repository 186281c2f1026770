"""TSEA and feature dashboards: enrichment against an independent KS reference, the projection
against the model's own forward, a planted English-name feature, token sets, dashboards, CLI."""

from __future__ import annotations

import html
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxlm.config import ModelConfig
from jaxlm.errors import UserError
from jaxlm.model import init_model
from jaxlm.tokenizer import Tokenizer
from sae.analysis import dashboards as db
from sae.analysis import tsea
from sae.base import SAE, SAEConfig
from sae.io import save_sae
from sae.registry import create

TOL = 1e-5  # simple ops in fp32 (STYLE.md)


def _set(param, value) -> None:
    param.set_value(jnp.asarray(value, jnp.float32))


def _model(V: int, D: int = 32, F: int = 64, layers: int = 2, seed: int = 0):
    cfg = ModelConfig(
        vocab_size=V, d_model=D, n_layers=layers, n_heads=4, d_mlp=F, max_positions=64
    )
    model = init_model(cfg, seed)
    rng = np.random.default_rng(seed + 1)  # a non-trivial final LayerNorm, so folding matters
    _set(model.ln_f.scale_d, rng.uniform(0.5, 1.5, D))
    _set(model.ln_f.bias_d, rng.normal(0, 0.1, D))
    return model


@pytest.fixture(scope="module")
def tok2000(demo_data):
    """A 2000-piece tokenizer on the demo corpus: large enough for whole-name pieces."""
    from jaxlm.cli import main

    d = demo_data["dir"]
    out = d / "tok2000"
    if not out.exists():
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(d / "translated.jsonl"),
                "--input",
                str(d / "native.jsonl"),
                "--vocab-size",
                "2000",
                "--out",
                str(out),
            ]
        )
    return Tokenizer.load(out)


# --- enrichment ---------------------------------------------------------------------------------


def _running_sum_reference(scores_v: np.ndarray, members: np.ndarray) -> float:
    """GSEA's running sum written out, as SAELens' calculate_batch_enrichment_scores does it."""
    V, n = len(scores_v), len(members)
    hits = np.isin(np.argsort(-scores_v, kind="stable"), members)
    steps = np.where(hits, 1.0 / n, -1.0 / (V - n))
    return float(np.abs(np.cumsum(steps)).max())


def test_enrichment_equals_ks_statistic_and_running_sum():
    rng = np.random.default_rng(0)
    S, V = 40, 700
    proj = rng.normal(size=(S, V)).astype(np.float32)
    proj[:5, :30] += 2.0  # a few features that strongly promote the first tokens
    sets = [rng.choice(V, n, replace=False) for n in (1, 5, 50, 349)] + [np.arange(30)]
    scores, signs = tsea.enrichment_scores(proj, sets, chunk=7)  # chunks of 7: boundaries too
    ks = [
        [stats.ks_2samp(proj[f, s], np.delete(proj[f], s), method="asymp") for f in range(S)]
        for s in sets
    ]
    ref_d = np.array([[r.statistic for r in row] for row in ks])
    ref_p = np.array([[r.pvalue for r in row] for row in ks])
    ref_rs = np.array([[_running_sum_reference(proj[f], s) for f in range(S)] for s in sets])
    assert np.abs(scores - ref_d).max() < TOL
    assert np.abs(scores - ref_rs).max() < TOL
    p = tsea.ks_pvalues(scores, [len(s) for s in sets], V)
    assert np.abs(p - ref_p).max() < TOL
    assert (signs[-1, :5] == 1).all() and (p[-1, :5] < 1e-10).all()


def test_enrichment_hand_cases():
    proj = np.array([[4.0, 3.0, 2.0, 1.0]], np.float32)  # ranking: tokens 0, 1, 2, 3
    cases = {  # set: (score, sign), from the running sums written out
        (0,): (1.0, 1),  # +1, -1/3, -2/3, -1 ... max |.| = 1 at the top
        (3,): (1.0, -1),  # -1/3, -2/3, -1, 0: the set sits at the bottom
        (0, 2): (0.5, 1),  # +1/2, 0, +1/2, 0
        (1,): (2 / 3, 1),  # -1/3, +2/3, +1/3, 0
        (1, 2): (0.5, 1),  # -1/2, 0, +1/2, 0: a tie, read as promoting
    }
    scores, signs = tsea.enrichment_scores(proj, [np.array(s) for s in cases])
    for i, (want, sign) in enumerate(cases.values()):
        assert abs(scores[i, 0] - want) < TOL
        assert signs[i, 0] == sign


def test_projection_stats_and_corrections():
    rng = np.random.default_rng(1)
    x = rng.gamma(2.0, size=(6, 500)).astype(np.float32)
    got = tsea.projection_stats(x)
    np.testing.assert_allclose(got["mean"], x.mean(1), rtol=TOL)
    np.testing.assert_allclose(got["std"], x.std(1), rtol=TOL)
    np.testing.assert_allclose(got["skewness"], stats.skew(x, axis=1), rtol=1e-4)
    np.testing.assert_allclose(got["kurtosis"], stats.kurtosis(x, 1, fisher=False), rtol=1e-4)
    p = rng.uniform(size=(3, 50)) ** 3
    want = stats.false_discovery_control(p, axis=-1)
    assert np.abs(tsea.adjust_pvalues(p, "bh") - want).max() < 1e-12
    assert np.array_equal(tsea.adjust_pvalues(p, "bonferroni"), np.minimum(p * 50, 1))


def test_null_baseline_discounts_sets_that_cluster_in_embedding_space():
    """Names that share an embedding direction are ranked together by almost any direction: the
    KS p-value calls most random features enriched, the random-direction null does not."""
    V, D = 300, 32
    model = _model(V, D=D, F=64, layers=1, seed=8)
    rng = np.random.default_rng(8)
    names = rng.choice(np.arange(4, V), 20, replace=False)
    wte = np.asarray(model.wte_vd[...]).copy()
    u_d = rng.normal(size=D)
    wte[names] += 0.1 * u_d / np.linalg.norm(u_d)
    _set(model.wte_vd, wte)
    W_dec = rng.normal(size=(200, 64)).astype(np.float32)  # a random "SAE"
    res = tsea.tsea(model, W_dec, 0, {"names": names}, n_null=512)
    summary = res.set_summary("names")
    assert summary["n_significant"] > 60  # p-values: about 45% of random features "enriched"
    above = summary["n_promoting_above_null"] + summary["n_suppressing_above_null"]
    assert 1 <= above <= 10  # the null: about 1% of them, as for any random direction (2 here)
    # the threshold is the 0.99 quantile of the 512 random directions, not a stricter one
    np.testing.assert_allclose(res.null_thresholds, np.quantile(res.null_scores, 0.99, axis=1))
    assert np.mean(res.null_scores > res.null_thresholds[:, None]) == pytest.approx(0.01, abs=0.003)


# --- projection ---------------------------------------------------------------------------------


def test_projection_is_the_logit_change_through_the_forward():
    """A model whose final residual is exactly the last MLP's output: logits = LN(d W_out) W_U.

    Layer 0 writes nothing, layer 1's attention writes nothing and its MLP hidden is the constant
    gelu(b_up) = d. Then std(d W_out) * (logits - ln_f.bias W_U), centred over the vocabulary, is
    the folded, centred projection of d, exactly (LayerNorm is scale-free).
    """
    V, D, F = 50, 16, 24
    model = _model(V, D, F, layers=2)
    rng = np.random.default_rng(2)
    for b in model.blocks:
        _set(b.attn.w_o_nhd, np.zeros_like(b.attn.w_o_nhd[...]))
    _set(model.blocks[0].mlp.w_down_fd, np.zeros((F, D)))
    _set(model.blocks[1].mlp.w_up_df, np.zeros((D, F)))
    _set(model.blocks[1].mlp.b_up_f, rng.normal(size=F))
    wte = np.asarray(model.wte_vd[...]).copy()
    wte[0] = 0.0
    _set(model.wte_vd, wte)
    _set(model.wpe_pd, np.zeros_like(model.wpe_pd[...]))
    tokens = jnp.zeros((1, 1), jnp.int32)
    logits, hidden = model(tokens), model.mlp_activations(tokens, (1,))
    d_f = np.asarray(hidden[1][0, 0])
    x_d = d_f @ np.asarray(model.blocks[1].mlp.w_down_fd[...])
    sigma = np.sqrt(x_d.var() + model.cfg.layer_norm_eps)
    want = sigma * (np.asarray(logits[0, 0]) - np.asarray(model.ln_f.bias_d[...]) @ wte.T)
    want -= want.mean()
    got = tsea.feature_vocab_projection(model, d_f[None], 1)[0]
    assert np.abs(got - want).max() < TOL * np.abs(want).max()


def test_projection_matches_numpy_on_exported_hf_weights():
    from jaxlm.hf import to_hf_tensors

    model = _model(V=120, D=32, F=48, layers=2, seed=3)
    t = to_hf_tensors(model)
    W_dec = np.random.default_rng(3).normal(size=(37, 48)).astype(np.float32)
    W_out_fd = t["transformer.h.0.mlp.c_proj.weight"].T  # torch [out, in] -> [F, D]
    W_U = t["transformer.ln_f.weight"][:, None] * t["transformer.wte.weight"].T  # [D, V]
    r = W_dec @ W_out_fd
    r -= r.mean(1, keepdims=True)
    want = r @ W_U
    want -= want.mean(1, keepdims=True)
    got = tsea.feature_vocab_projection(model, W_dec, 0, chunk=16)
    assert np.abs(got - want).max() < TOL * np.abs(want).max()
    W_Uc = W_U - W_U.mean(0) - (W_U - W_U.mean(0)).mean(1, keepdims=True)
    cos = (r / np.linalg.norm(r, axis=1, keepdims=True)) @ (W_Uc / np.linalg.norm(W_Uc, axis=0))
    got_cos = tsea.feature_vocab_projection(model, W_dec, 0, cosine_sim=True)
    assert np.abs(got_cos - cos).max() < TOL and np.abs(got_cos).max() <= 1 + TOL


# --- planted signal -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tok2000):
    """A 1-layer random model (D = F = 512) and a direction d [F] that promotes exactly the
    English-name tokens, as well as least squares through W_out @ W_U (the pseudo-inverse) can."""
    sets = tsea.demo_token_sets(tok2000)
    model = _model(tok2000.vocab_size, D=512, F=512, layers=1, seed=0)
    M_fv = np.asarray(tsea.mlp_out_weight(model, 0) @ tsea.folded_unembedding(model), np.float64)
    target_v = np.zeros(tok2000.vocab_size)
    target_v[sets["english_names"]] = 1.0
    # rcond: M is rank D - 1 (W_U is centred over D); float32 leaves that null direction at
    # ~1e-9 of the largest singular value, which numpy's default 1e-15 would invert
    d_f = target_v @ np.linalg.pinv(M_fv, rcond=1e-6)
    return model, d_f / np.linalg.norm(d_f), sets


def _decoder(d_f, planted_at: int | None, S: int = 64, seed: int = 7) -> np.ndarray:
    """W_dec [S, F]: random unit rows, row `planted_at` replaced by d."""
    W_dec = np.random.default_rng(seed).normal(size=(S, len(d_f))).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    if planted_at is not None:
        W_dec[planted_at] = d_f
    return W_dec


def test_planted_english_name_feature_ranks_first_and_random_sets_stay_quiet(tok2000, planted):
    model, d_f, sets = planted
    sets = dict(sets)
    names = sets["english_names"]
    others = np.setdiff1d(np.arange(tok2000.vocab_size), np.concatenate([names, np.arange(4)]))
    sets["random"] = np.random.default_rng(5).choice(others, len(names), replace=False)
    W_dec = _decoder(d_f, planted_at=17)
    res = tsea.tsea(model, W_dec, 0, sets, chunk=24, correction="bonferroni")
    i, r = res.set_names.index("english_names"), res.set_names.index("random")
    assert int(np.argmax(res.scores[i])) == 17 and res.signs[i, 17] == 1
    assert res.p_adjusted[i, 17] < 1e-30 and res.scores[i, 17] > 0.9
    assert res.beats_null()[i, 17] and res.null_scores.shape == (len(sets), 256)
    assert set(res.top_ids[17]) <= set(names.tolist())  # its ten best tokens are all names
    assert not (res.p_adjusted[r] < 0.05).any(), res.p_adjusted[r].min()
    # the chunked analysis equals the whole projection analysed at once
    proj = tsea.feature_vocab_projection(model, W_dec, 0, chunk=24)
    scores, _ = tsea.enrichment_scores(proj, [sets[n] for n in res.set_names], chunk=10)
    assert np.abs(scores - res.scores).max() < TOL
    np.testing.assert_array_equal(res.top_ids[:, 0], proj.argmax(1))


def test_compare_reads_the_fading_feature(tok2000, planted, tmp_path):
    model, d_f, sets = planted
    before = tsea.tsea(model, _decoder(d_f, planted_at=3), 0, sets)
    after = tsea.tsea(model, _decoder(d_f, planted_at=None), 0, sets)
    texts = tsea.display_texts(tok2000)
    out = tsea.compare(before, after, texts_before=texts, texts_after=texts, top=3)
    en = out["sets"]["english_names"]
    assert en["before"]["top_features"][0]["feature"] == 3
    assert en["before"]["top_features"][0]["direction"] == "promotes"
    assert en["before"]["n_significant_promoting"] >= 1
    assert en["change"]["n_promoting_above_null"] == -1  # the other 63 rows are the same
    assert en["before"]["top_features"][0]["above_null"]
    top_tokens = en["before"]["top_features"][0]["top_tokens"]
    assert {t.strip() for t in top_tokens} <= set(tsea.demo_word_lists()["english_names"])
    json.dumps(out)  # serialisable as is
    png = tsea.manhattan_plot({"before": before, "after": after}, tmp_path / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- token sets ---------------------------------------------------------------------------------


def test_token_sets_from_the_demo_tokenizer(tok2000, demo_data):
    sets = tsea.demo_token_sets(tok2000)
    pieces = [tok2000.id_to_piece(i) for i in range(tok2000.vocab_size)]
    for name, words in tsea.demo_word_lists().items():
        got = {pieces[i].lstrip("\u2581") for i in sets[name]}
        assert got == set(words), name  # every demo name is a whole piece at 2000 pieces
    texts = tsea.token_texts(tok2000)
    assert all('"' in texts[i] for i in sets["latin_double_quote"])
    assert {"«", "»"} <= {pieces[i] for i in sets["arabic_quotes"]}
    assert "،" in {pieces[i] for i in sets["arabic_comma"]}
    assert not set(sets["arabic_quotes"]) & set(sets["latin_double_quote"])
    # at 400 pieces no name is a whole piece: a one-line error naming the set
    with pytest.raises(UserError, match="token set 'english_names' is empty"):
        tsea.demo_token_sets(Tokenizer.load(demo_data["tok"]))
    # byte pieces: ASCII ones read as their character, others belong to no set
    assert texts[pieces.index("<0x41>")] == "A" and texts[pieces.index("<0xD8>")] is None
    assert texts[:4] == [None] * 4


def test_token_sets_from_shared_name_lists(tok2000, shared_data, tmp_path):
    names = shared_data / "names"
    en = tsea.load_word_list(names / "english_first_names_arabic_script.tsv", "arabic")
    ar = tsea.load_word_list(names / "arabic_first_names.txt")
    assert len(en) == 4396 and len(ar) == 845 and "جيمس" in en
    sets = tsea.build_token_sets(tok2000, words={"english": en, "arabic": ar})
    texts = tsea.token_texts(tok2000)
    got_ar = {texts[i].strip() for i in sets["arabic"]}
    assert {"يوسف", "مريم", "خالد"} <= got_ar and got_ar <= set(ar)
    assert {texts[i].strip() for i in sets["english"]} <= set(en)
    with pytest.raises(UserError, match="no column 'arab'.*english, arabic"):
        tsea.load_word_list(names / "english_first_names_arabic_script.tsv", "arab")
    # a byte order mark (Windows editors write one) is not part of the header's first name
    bom = tmp_path / "bom.tsv"
    bom.write_bytes(b"\xef\xbb\xbfenglish\tarabic\nJames\t" + "جيمس".encode() + b"\n")
    assert tsea.load_word_list(bom, "english") == ["James"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(UserError, match="empty.txt: no words"):
        tsea.load_word_list(empty)


# --- dashboards ---------------------------------------------------------------------------------


def _sae(F: int, S: int, arch: str = "standard", seed: int = 0, **kw) -> SAE:
    """A registry SAE with tied random weights, a negative encoder bias and (jumprelu) thresholds
    spread over the pre-activations' range."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(F, S)).astype(np.float32)
    sae = create(SAEConfig(architecture=arch, d_in=F, d_sae=S, **kw))
    tensors = {
        "W_enc": W,
        "b_enc": np.full(S, -0.3, np.float32),
        "W_dec": W.T.copy(),
        "b_dec": rng.normal(0, 0.05, F).astype(np.float32),
    }
    if arch == "jumprelu":
        tensors["threshold"] = np.linspace(0, 2, S).astype(np.float32)
    sae.load_tensors(tensors)
    return sae


def _reference_acts(sae: SAE, h_nf: np.ndarray) -> np.ndarray:
    """Each architecture's inference encoder written out in numpy, from the SAE's tensors."""
    _, t = sae.inference_tensors()
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    pre = (h_nf - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    if sae.architecture == "jumprelu":
        return np.where(pre > t["threshold"], np.maximum(pre, 0), 0)
    if sae.architecture == "topk":
        kth = np.sort(pre, -1)[:, -int(sae.cfg.k)][:, None]
        return np.where(pre >= kth, np.maximum(pre, 0), 0)
    return np.maximum(pre, 0)


DASH_SAES = [("standard", {}), ("topk", {"k": 3, "rescale_acts_by_decoder_norm": False}),
             ("jumprelu", {})]  # fmt: skip


@pytest.mark.parametrize(("arch", "kw"), DASH_SAES, ids=[a for a, _ in DASH_SAES])
def test_dashboard_contexts_are_the_top_activations(demo_data, tmp_path, arch, kw):
    tok = Tokenizer.load(demo_data["tok"])
    model = _model(tok.vocab_size, D=32, F=64, layers=2, seed=4)
    sae = _sae(64, 40, arch, **kw)
    feats = np.array([0, 5, 17, 39])
    batches = list(db.read_rows(demo_data["translated"], max_rows=48, batch_size=16))
    k, left, right = 5, 6, 2
    texts = tsea.display_texts(tok)
    data = db.dashboards(model, sae, 1, batches, feats, texts, k=k, left=left, right=right)
    rows = np.concatenate(batches)  # [R, T]
    h = np.asarray(model.mlp_activations(jnp.asarray(rows), (1,))[1])  # [R, T, F]
    acts = _reference_acts(sae, h.reshape(-1, 64)).reshape(*rows.shape, 40)[..., feats]
    assert data["tokens_seen"] == rows.size
    assert sum(len(f["contexts"]) for f in data["features"]) >= 2 * k  # features do fire
    for j, f in enumerate(data["features"]):
        a = acts[..., j]
        want = np.sort(a[a > 0].ravel())[::-1][:k]
        got = np.array([c["activation"] for c in f["contexts"]])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert abs(f["density"] - (a > 0).mean()) < 1e-9
        assert abs(f["max_activation"] - a.max()) < 1e-4
        for c in f["contexts"]:
            r, t = c["row"], c["position"]
            assert abs(a[r, t] - c["activation"]) < 1e-4
            lo = max(0, t - left)
            assert c["tokens"] == [texts[i] for i in rows[r, lo : t + right + 1]]
            assert c["max_index"] == t - lo and c["acts"][c["max_index"]] == c["activation"]
    j, html_path = db.write_dashboards(data, tmp_path)
    assert json.loads(j.read_text())["features"][2]["feature"] == 17
    assert 'dir="auto"' in html_path.read_text()


def test_dashboard_html_escapes_text():
    evil = '<script>alert("x")</script>'
    data = {
        "layer": 0,
        "tokens_seen": 3,
        "k": 1,
        "features": [
            {
                "feature": 0,
                "density": 0.5,
                "max_activation": 1.0,
                "promotes": [{"token": evil, "weight": 1.0}],
                "suppresses": [],
                "contexts": [
                    {
                        "row": 0,
                        "position": 1,
                        "activation": 1.0,
                        "tokens": ["a", evil, "ليلي"],
                        "acts": [0.0, 1.0, 0.2],
                        "max_index": 1,
                    }
                ],
            }
        ],
    }
    page = db.render_html(data, title="<b>t</b>")
    assert "<script>" not in page and "<b>t</b>" not in page
    assert page.count("&lt;script&gt;") == 2 and "ليلي" in page


def _visible_text(fragment: str) -> str:
    """What a reader sees of an HTML fragment: the text outside tags (attributes dropped)."""
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def test_dashboard_shows_byte_pieces_as_characters():
    """`»` is `<0xC2><0xBB>` in the demo's tokenizer: the page shows the character, on one item
    over both tokens (shaded by their highest activation, each listed in its tooltip), the outline
    on it when the maximum is its second byte; a window cutting it shows it too (its other byte
    kept in "after"), and a lone byte reads `‹byte C2›`, in context and among promoted tokens."""
    tokens = [" قال", ":", " «", "لا", "!", "<0xC2>", "<0xBB>", "\n\n", "<0xC2>"]
    acts = [0.0, 0.1, 0.0, 0.2, 0.0, 0.3, 0.9, 0.0, 0.4]
    shown = db.shown_tokens(tokens, after=["<0xBB>"])
    assert [(s.text, s.start, s.stop) for s in shown] == [
        (" قال", 0, 1), (":", 1, 2), (" «", 2, 3), ("لا", 3, 4), ("!", 4, 5), ("»", 5, 7),
        ("\n\n", 7, 8), ("»", 8, 9)
    ]  # fmt: skip
    assert shown[-1].after == ("<0xBB>",) and not any(s.byte for s in shown)
    ctx = {"row": 0, "position": 6, "activation": 0.9, "tokens": tokens, "acts": acts,
           "max_index": 6, "after": ["<0xBB>"]}  # fmt: skip
    lone = dict(ctx, tokens=tokens[:-1] + ["<0xC2>"], after=[])  # the row ends: no "<0xBB>"
    feature = {"feature": 3, "density": 0.1, "max_activation": 0.9, "contexts": [ctx, lone],
               "promotes": [{"token": "<0xC2>", "weight": 0.5}, {"token": " «", "weight": 0.4}],
               "suppresses": []}  # fmt: skip
    page = db.render_html({"layer": 0, "tokens_seen": 9, "k": 2, "features": [feature]})
    lines = re.findall(r'<div class="ctx">.*?</div>', page, re.S)
    seen = [_visible_text(line) for line in lines]
    assert seen[0].endswith("قال: «لا!»\u21b5\u21b5»") and "<0x" not in seen[0]
    assert seen[1].endswith("قال: «لا!»\u21b5\u21b5\u2039byte C2\u203a")
    # the marked item is the whole character, its tooltip both bytes with their activations
    mark = re.search(r'<mark title="([^"]*)"><span style="([^"]*)">([^<]*)</span></mark>', lines[0])
    assert mark is not None and mark.group(3) == "»"
    assert html.unescape(mark.group(1)) == "» is 2 tokens:\n<0xC2> 0.3\n<0xBB> 0.9"
    assert "rgba(255, 140, 0, 1.00)" in mark.group(2)  # 0.9 / max 0.9: the span's highest
    cut = re.findall(r'<span title="([^"]*)"[^>]*>»</span>', lines[0])[-1]
    assert html.unescape(cut) == "» is 2 tokens:\n<0xC2> 0.4\n<0xBB> (after this context)"
    chips = re.search(r'<div class="chips pos">.*?</div>', page, re.S).group(0)
    assert _visible_text(chips) == "promotes: \u2039byte C2\u203a «"
    assert db.shown_text("<0xBB>") == "\u2039byte BB\u203a" and db.shown_text(" قال") == " قال"
    assert "\u2039byte C2\u203a" in _visible_text(
        re.search(r'<p class="legend">.*?</p>', page).group(0)
    )


def test_dashboard_shows_control_pieces_as_what_they_mean():
    """`</s>` is the token between two packed stories: the page reads `‹end of story›` (styled
    apart, its tooltip naming the piece), in context and among promoted tokens; the JSON keeps the
    piece. Beside a cut character too."""
    tokens = ["!", "</s>", " كان", "</s>", "<0xBB>"]
    shown = db.shown_tokens(tokens)
    assert [(s.text, s.start, s.stop, s.control) for s in shown] == [
        ("!", 0, 1, False), ("\u2039end of story\u203a", 1, 2, True), (" كان", 2, 3, False),
        ("\u2039end of story\u203a", 3, 4, True), ("\u2039byte BB\u203a", 4, 5, False),
    ]  # fmt: skip
    assert db.shown_text("</s>") == "\u2039end of story\u203a" and db.shown_text("<s>") != "<s>"
    ctx = {"row": 0, "position": 1, "activation": 0.5, "tokens": tokens,
           "acts": [0.0, 0.5, 0.1, 0.0, 0.0], "max_index": 1}  # fmt: skip
    feature = {"feature": 7, "density": 0.1, "max_activation": 0.5, "contexts": [ctx],
               "promotes": [{"token": "</s>", "weight": 0.5}], "suppresses": []}  # fmt: skip
    page = db.render_html({"layer": 0, "tokens_seen": 5, "k": 1, "features": [feature]})
    line = re.search(r'<div class="ctx">.*?</div>', page, re.S).group(0)
    assert "&lt;/s&gt;" not in _visible_text(line) and "\u2039end of story\u203a" in line
    mark = re.search(r'<mark title="([^"]*)">', line)
    assert (
        mark is not None and html.unescape(mark.group(1)) == "</s> 0.5 (a control token, not text)"
    )
    chips = re.search(r'<div class="chips pos">.*?</div>', page, re.S).group(0)
    assert _visible_text(chips) == "promotes: \u2039end of story\u203a"


def test_dashboard_contexts_keep_the_bytes_a_window_cuts():
    """A window starting after a character's first byte and ending before its last: the JSON keeps
    the window's own pieces (positions and activations index them) and, in "before"/"after", the
    pieces outside it that complete the characters, so the page shows both."""
    texts = ["a", "b", "<0xC2>", "<0xBB>"]
    row = np.array([[0, 2, 3, 1, 0, 1, 2, 3, 1]])
    acts = np.zeros((1, 9, 1), np.float32)
    acts[0, 4, 0] = 1.0
    acts[0, 2, 0] = 0.5
    store = db.ContextStore(k=1, left=2, right=2, n_features=1)
    store.add(row, acts, row0=0)
    (c,) = db._contexts(store, 0, texts)
    assert c["tokens"] == ["<0xBB>", "b", "a", "b", "<0xC2>"] and c["max_index"] == 2
    assert c["acts"] == [0.5, 0.0, 1.0, 0.0, 0.0]
    assert c["before"] == ["<0xC2>"] and c["after"] == ["<0xBB>"]
    shown = db.shown_tokens(c["tokens"], c["before"], c["after"])
    assert [(s.text, s.start, s.stop) for s in shown] == [
        ("»", 0, 1), ("b", 1, 2), ("a", 2, 3), ("b", 3, 4), ("»", 4, 5)
    ]  # fmt: skip
    # at the row's edges there is nothing outside: the bytes read as bytes
    store = db.ContextStore(k=1, left=2, right=2, n_features=1)
    store.add(row[:, 2:7], acts[:, 2:7], row0=0)  # <0xBB> b a b <0xC2>
    (c,) = db._contexts(store, 0, texts)
    assert "before" not in c and "after" not in c
    assert [s.text for s in db.shown_tokens(c["tokens"])] == [
        "\u2039byte BB\u203a", "b", "a", "b", "\u2039byte C2\u203a"
    ]  # fmt: skip


# --- CLI ----------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    from jaxlm.cli import main

    return main(["sae", *argv])


def test_cli_pulse_and_bad_input(tok2000, demo_data, shared_data, tmp_path, capsys, monkeypatch):
    from jaxlm.checkpoint import save_model

    monkeypatch.chdir(tmp_path)  # the refused runs' --out o (its lock file stays beside it)

    model = _model(tok2000.vocab_size, D=32, F=64, layers=2, seed=6)
    save_model(tmp_path / "m", model, tokenizer=str(tok2000.path.parent))
    save_sae(tmp_path / "sae", _sae(64, 24), layer=1)
    common = [
        "--demo-sets",
        "--names",
        f"ssa_ar={shared_data}/names/english_first_names_arabic_script.tsv#arabic",
    ]
    assert (
        _cli(
            [
                "tsea",
                "--model",
                str(tmp_path / "m"),
                "--sae",
                str(tmp_path / "sae"),
                *common,
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 0
    )
    out = json.loads((tmp_path / "t/tsea.json").read_text())
    assert set(out["sets"]) == {
        "english_names",
        "arabic_names",
        "ssa_ar",
        "english_names_starts",  # every word list also as its words' first tokens
        "arabic_names_starts",
        "ssa_ar_starts",
        "latin_double_quote",
        "arabic_quotes",
        "arabic_comma",
        "punctuation",
    }
    # --demo-sets contrasts name starts and quotes; no --data, no sparsity file: all counted
    assert set(out["contrasts"]) == {
        "english_names_starts-arabic_names_starts",
        "latin_double_quote-arabic_quotes",
    }
    assert out["dead_features_from"].startswith("none") and out["n_dead"] == 0
    assert out["layer"] == 1 and (tmp_path / "t/tsea.png").stat().st_size > 0
    m, s = str(tmp_path / "m"), str(tmp_path / "sae")
    assert (
        _cli(
            [
                "tsea-compare",
                "--before",
                m,
                s,
                "--after",
                m,
                s,
                *common,
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    cmp = json.loads((tmp_path / "c/tsea_compare.json").read_text())
    assert cmp["sets"]["english_names"]["change"]["n_significant"] == 0  # same SAE twice
    assert cmp["contrasts"]["latin_double_quote-arabic_quotes"]["change"]["mean"] == 0
    capsys.readouterr()
    # the dashboard reads the demo DATADIR, tokenised with the 400-piece tokenizer: a 400 model
    tok400 = Tokenizer.load(demo_data["tok"])
    save_model(
        tmp_path / "m400", _model(tok400.vocab_size, D=32, F=64), tokenizer=str(demo_data["tok"])
    )
    assert (
        _cli(
            [
                "dashboard",
                "--model",
                str(tmp_path / "m400"),
                "--sae",
                s,
                "--data",
                str(demo_data["translated"]),
                "--features",
                "0-3,7",
                "--rows",
                "20",
                "--out",
                str(tmp_path / "d"),
            ]
        )
        == 0
    )
    dash = json.loads((tmp_path / "d/dashboards.json").read_text())
    assert [f["feature"] for f in dash["features"]] == [0, 1, 2, 3, 7]
    capsys.readouterr()
    norm_sae = _sae(64, 24, normalize_activations="expected_average_only_in")
    save_sae(tmp_path / "norm", norm_sae, layer=1)
    save_sae(tmp_path / "nolayer", _sae(64, 24))
    sets = ["--demo-sets", "--out", "o"]
    bad = [
        (
            ["tsea", "--model", m, "--sae", str(tmp_path / "norm"), *sets],
            "normalize_activations='expected_average_only_in' is not supported here",
        ),
        (
            ["tsea", "--model", m, "--sae", str(tmp_path / "nolayer"), *sets],
            "nolayer/cfg.json: names no layer (jaxlm.layer, hook_layer, hook_name); pass --layer",
        ),
        (["tsea", "--model", m, "--sae", s, "--layer", "2", *sets], "has layers 0..1"),
        (
            ["tsea", "--model", m, "--sae", s, "--names", f"x={tmp_path}/nope.txt", "--out", "o"],
            "nope.txt: cannot read",
        ),
        (
            ["tsea", "--model", m, "--sae", str(tmp_path), "--demo-sets", "--out", "o"],
            "cfg.json: cannot read",
        ),
        (["tsea", "--model", m, "--sae", s, "--out", "o"], "no token sets"),
        (
            [
                "dashboard",
                "--model",
                str(tmp_path / "m400"),
                "--sae",
                s,
                "--data",
                str(demo_data["translated"]),
                "--features",
                "0-99",
                "--out",
                "o",
            ],
            "--features '0-99': the SAE has features 0..23",
        ),
        (  # the 2000-piece model's tokenizer would decode the 400-piece data's ids as other text
            ["dashboard", "--model", m, "--sae", s, "--data", str(demo_data["translated"])]
            + ["--features", "0", "--out", "o"],
            "is not the one the data was tokenised with",
        ),
    ]
    for argv, msg in bad:
        assert _cli(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], lines
