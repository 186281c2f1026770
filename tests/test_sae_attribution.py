"""Attribution of an MLP layer's direct push over SAE features, contexts, the TSEA contrast,
feature matching, and the `sae attribute | match` commands."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import ModelConfig
from jaxlm.errors import UserError
from jaxlm.eval.wordlists import demo_word_lists
from jaxlm.model import init_model
from jaxlm.tokenizer import Tokenizer
from sae.analysis import attribution as at
from sae.analysis import matching, tsea
from sae.base import SAEConfig
from sae.io import save_sae
from sae.registry import create

TOL = 1e-4  # the bar for the split; fp32 activations, float64 sums


def _set(param, value) -> None:
    param.set_value(jnp.asarray(value, jnp.float32))


def _model(V: int, D: int = 32, F: int = 64, layers: int = 2, seed: int = 0):
    """A random model with weights large enough that every part is O(1), and a non-trivial ln_f."""
    cfg = ModelConfig(vocab_size=V, d_model=D, n_layers=layers, n_heads=4, d_mlp=F,
                      max_positions=64)  # fmt: skip
    model = init_model(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    for b in model.blocks:
        _set(b.mlp.w_up_df, rng.normal(0, 0.3, (D, F)))
        _set(b.mlp.w_down_fd, rng.normal(0, 0.3, (F, D)))
        _set(b.mlp.b_down_d, rng.normal(0, 0.2, D))
    _set(model.ln_f.scale_d, rng.uniform(0.5, 1.5, D))
    _set(model.ln_f.bias_d, rng.normal(0, 0.1, D))
    _set(model.wte_vd, rng.normal(0, 0.5, (V, D)))
    return model


def _sae(F: int, S: int, arch: str = "standard", seed: int = 0, **kw):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(F, S)).astype(np.float32)
    sae = create(SAEConfig(architecture=arch, d_in=F, d_sae=S, **kw))
    tensors = {
        "W_enc": W * 0.3,
        "b_enc": np.full(S, -0.2, np.float32),
        "W_dec": (W.T * rng.uniform(0.05, 0.3, (S, 1))).astype(np.float32),
        "b_dec": rng.normal(0, 0.05, F).astype(np.float32),
    }
    if arch == "jumprelu":
        tensors["threshold"] = np.linspace(0, 0.5, S).astype(np.float32)
    sae.load_tensors(tensors)
    return sae


# --- the exact split ----------------------------------------------------------------------------


def _own_forward(model, tokens_bt):
    """The final residual, block by block, written here (not the model's `_run`)."""
    B, T = tokens_bt.shape
    x = model.wte_vd[...][tokens_bt] + model.wpe_pd[...][jnp.arange(T)][None]
    for block in model.blocks:
        x, _, _ = block(x, q_slot_t=jnp.arange(T), valid_bs=None, kv=None, write=None)
    return np.asarray(x, np.float64)


SAES = [("standard", {}), ("topk", {"k": 4, "rescale_acts_by_decoder_norm": True}),
        ("jumprelu", {})]  # fmt: skip


@pytest.mark.parametrize(("arch", "kw"), SAES, ids=[a for a, _ in SAES])
def test_parts_sum_to_the_layers_direct_contribution(arch, kw):
    V, D, F, S, L = 60, 32, 64, 48, 1
    model = _model(V, D, F, layers=2, seed=3)
    sae = _sae(F, S, arch, **kw)
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(0, V, (3, 10)), jnp.int32)
    set_a, set_b = np.array([5, 7, 11]), np.array([20, 21])
    x_btd, h_btf, a_bts = at.forward_fn(model, sae, L)(tokens)
    ro = at.Readout.of(model, L)
    W_eff, b_eff = at.effective_decoder(sae)
    flat = lambda t: np.asarray(t, np.float64).reshape(-1, t.shape[-1])  # noqa: E731
    u = ro.direction(set_a, set_b)
    u_cd = np.broadcast_to(u, (30, D))
    d = at.decompose(ro, u_cd, flat(x_btd), flat(h_btf), flat(a_bts), W_eff, b_eff)

    # independently: the residual from our own block loop reproduces the model's logits ...
    x = _own_forward(model, tokens).reshape(-1, D)
    logits = np.asarray(model(tokens), np.float64).reshape(-1, V)
    gamma, beta = np.asarray(model.ln_f.scale_d[...]), np.asarray(model.ln_f.bias_d[...])
    mu, sd = x.mean(1, keepdims=True), np.sqrt(x.var(1, keepdims=True) + model.cfg.layer_norm_eps)
    wte = np.asarray(model.wte_vd[...], np.float64)
    assert np.abs(((x - mu) / sd * gamma + beta) @ wte.T - logits).max() < TOL
    # ... the logit difference is the model's, and layer L's direct part is its centred output
    # over the frozen std, read along gamma * u
    want_ld = logits[:, set_a].mean(1) - logits[:, set_b].mean(1)
    assert np.abs(d["logit_diff"] - want_ld).max() < TOL
    h = np.asarray(model.mlp_activations(tokens, (L,))[L], np.float64).reshape(-1, F)
    m = h @ np.asarray(model.blocks[L].mlp.w_down_fd[...]) + np.asarray(
        model.blocks[L].mlp.b_down_d[...]
    )
    direct = ((m - m.mean(1, keepdims=True)) / sd * gamma) @ u
    assert np.abs(d["total"] - direct).max() < TOL
    got = d["parts"].sum(1) + d["error"] + d["bias"]
    assert np.abs(got - direct).max() < TOL
    assert np.abs(direct).max() > 0.1  # the parts are not all tiny
    # the whole residual read the same way (plus ln_f's bias) is the model's logit difference:
    # the frozen 1/std is LayerNorm's own
    whole = ((x - mu) / sd * gamma) @ u + beta @ u
    assert np.abs(whole - want_ld).max() < TOL
    # each feature's part is its activation times its own decoder row's read (topk: the row over
    # its norm, as the SAE decodes), written out here
    W_dec = np.asarray(sae.W_dec_sf[...], np.float64)
    if kw.get("rescale_acts_by_decoder_norm"):
        W_dec = W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)
    a = flat(a_bts)
    centred = W_dec @ np.asarray(model.blocks[L].mlp.w_down_fd[...])
    centred = centred - centred.mean(1, keepdims=True)
    want_parts = a * ((centred @ (gamma * u))[None] / sd)
    assert np.abs(d["parts"] - want_parts).max() < TOL
    assert (a > 0).any() and (a == 0).any()


def test_components_sum_to_the_logit_difference():
    """Embeddings + attention + each MLP + ln_f's bias is the model's own logit difference, and
    the MLP column of layer L is `decompose`'s layer total; the embeddings' column is written out
    here from the weights."""
    V, D, F, S = 60, 32, 64, 48
    model = _model(V, D, F, layers=3, seed=5)
    sae = _sae(F, S)
    rng = np.random.default_rng(6)
    tokens = jnp.asarray(rng.integers(0, V, (2, 12)), jnp.int32)
    u = at.Readout.of(model, 0).direction(np.array([3, 4]), np.array([9]))
    flat = lambda t: np.asarray(t, np.float64).reshape(-1, t.shape[-1])  # noqa: E731
    parts = np.asarray(at.components_fn(model)(tokens), np.float64)  # [1 + L, B, T, D]
    assert parts.shape == (4, 2, 12, D)
    parts_ckd = parts.reshape(4, -1, D).transpose(1, 0, 2)
    u_cd = np.broadcast_to(u, (24, D))
    for L in range(3):
        ro = at.Readout.of(model, L)
        x_btd, h_btf, a_bts = at.forward_fn(model, sae, L)(tokens)
        comp = at.components(ro, u_cd, flat(x_btd), parts_ckd)
        names = at.component_names(3)
        assert comp.shape == (24, len(names)) and names[2 + L] == f"mlp {L}"
        d = at.decompose(
            ro, u_cd, flat(x_btd), flat(h_btf), flat(a_bts), *at.effective_decoder(sae)
        )
        assert np.abs(comp.sum(1) - d["logit_diff"]).max() < TOL
        assert np.abs(comp[:, 2 + L] - d["total"]).max() < TOL
    x = flat(x_btd)
    sd = np.sqrt(x.var(1, keepdims=True) + model.cfg.layer_norm_eps)
    gamma = np.asarray(model.ln_f.scale_d[...], np.float64)
    emb = (np.asarray(model.wte_vd[...], np.float64)[np.asarray(tokens)]
           + np.asarray(model.wpe_pd[...], np.float64)[:12][None]).reshape(-1, D)  # fmt: skip
    want = ((emb - emb.mean(1, keepdims=True)) / sd * gamma) @ u
    assert np.abs(comp[:, 0] - want).max() < TOL
    assert np.abs(comp[:, 1]).max() > 0.01  # attention writes something


def test_what_attribute_gathers_on_the_device_is_the_full_forwards_at_the_contexts():
    """`gathered_fn` (one forward, gathered at P positions, firing counted on the device) gives
    `forward_fn`'s and `components_fn`'s values at those positions, and the firing count the
    full [B, T, S] acts give; `firing_count_fn` (TSEA's live features) counts the same."""
    from sae.analysis.dashboards import feature_acts_fn, firing_count_fn

    V, D, F, S, L = 60, 32, 64, 48, 1
    model = _model(V, D, F, layers=3, seed=5)
    sae = _sae(F, S)
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, V, (3, 10)), jnp.int32)
    x_btd, h_btf, a_bts = (np.asarray(a, np.float64) for a in at.forward_fn(model, sae, L)(tokens))
    parts_kbtd = np.asarray(at.components_fn(model)(tokens), np.float64)
    rows, pos = np.array([0, 2, 2, 1, 0], np.int32), np.array([3, 0, 9, 5, 3], np.int32)
    (x, h, a, parts), count = at.gathered_fn(model, sae, L)(np.asarray(tokens), rows, pos)
    assert x.shape == (5, D) and parts.shape == (5, 4, D)
    np.testing.assert_allclose(x, x_btd[rows, pos], atol=1e-5, rtol=0)
    np.testing.assert_allclose(h, h_btf[rows, pos], atol=1e-5, rtol=0)
    np.testing.assert_allclose(a, a_bts[rows, pos], atol=1e-5, rtol=0)
    np.testing.assert_allclose(parts, parts_kbtd[:, rows, pos].transpose(1, 0, 2), atol=1e-5,
                               rtol=0)  # fmt: skip
    want = (a_bts > 0).reshape(-1, S).sum(0)
    assert 0 < want.sum() < want.size * 30 and np.array_equal(count, want)
    assert np.array_equal(firing_count_fn(model, sae, L)(np.asarray(tokens)), want)
    acts = feature_acts_fn(model, sae, L, np.arange(S))(np.asarray(tokens))
    assert np.array_equal((acts > 0).reshape(-1, S).sum(0), want)
    (x0, *_), count0 = at.gathered_fn(model, sae, L)(np.asarray(tokens), rows[:0], pos[:0])
    assert x0.shape == (0, D) and np.array_equal(count0, want)  # no contexts in a batch


def test_a_decode_that_is_not_affine_is_refused():
    sae = _sae(16, 8)

    class Squared(type(sae)):
        def decode(self, acts_ns):
            return jnp.square(acts_ns) @ self.W_dec_sf[...] + self.b_dec_f[...]

    odd = Squared(sae.cfg, rngs=__import__("flax").nnx.Rngs(0))
    with pytest.raises(UserError, match="decode is not affine"):
        at.effective_decoder(odd)
    W, b = at.effective_decoder(sae)  # the base decode: the saved weights as they are
    assert np.array_equal(W, np.asarray(sae.W_dec_sf[...], np.float64))


# --- contexts -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok400(demo_data):
    return Tokenizer.load(demo_data["tok"])


def _expected(tok, text: str, ids, starts: list[tuple[int, int]]) -> set[tuple[int, int]]:
    """(context position, label) of targets starting at character s after a space. No piece
    crosses the boundary before a space, so the text before that space is the row's first k
    tokens; the first token is then "▁X..." at k (context k - 1), or X... at k + 1 after a lone
    "▁" piece (context k)."""
    out = set()
    for s, label in starts:
        assert text[s - 1] == " "
        k = len(tok.encode(text[: s - 1]))
        out.add((k if tok.id_to_piece(ids[k]) == "\u2581" else k - 1, label))
    return out


def test_contexts_on_hand_made_rows(tok400):
    lists = {"english": ["ليلي", "تيم", "تيمي", "سو"], "arabic": ["سلمى", "ليلى", "سو"]}
    names = at.name_contrast(tok400, lists)
    # at 400 pieces a name is several tokens: the context reads its first one
    assert len(tok400.encode(" تيمي")) > 1 and len(tok400.encode(" سلمى")) > 1
    text = ('قالت ليلي، "ماذا تفعل؟" قال تيمي. قالت سلمى: «هيا يا ليلى» وليلي '
            "تيمية سو ذهب مع تيم")  # fmt: skip
    ids = tok400.encode(text)
    ctx = at.find_contexts([ids], at.token_bytes(tok400), names)
    want = _expected(tok400, text, ids, [(text.index("تيمي"), 0), (text.index("سلمى"), 1)])
    assert set(zip(ctx.pos.tolist(), ctx.label.tolist(), strict=True)) == want
    # ليلي and ليلى both start with "▁ل" here: that token cannot tell them apart
    assert ctx.skipped["ambiguous_first_token"] == 2
    assert tok400.encode(" ليلي")[0] in names.ambiguous["space"]
    # "وليلي" and "تيمية" are not whole names, "سو" is in both lists, and "تيم" ends the row
    assert ctx.skipped["row_end"] == 1 and names.notes["words_in_both_lists"] == 1
    for p in ctx.pos:  # the first token is " X..." of the name's own encoding
        assert int(ids[p + 1]) in np.concatenate(names.sets["space"])
    assert tok400.encode(" تيمي")[0] in names.sets["space"][0]
    assert tok400.encode(" سلمى")[0] in names.sets["space"][1]

    quotes = at.quote_contrast(tok400)
    q = at.find_contexts([ids], at.token_bytes(tok400), quotes)
    want = _expected(tok400, text, ids, [(text.index('"'), 0), (text.index("«"), 1)])
    assert set(zip(q.pos.tolist(), q.label.tolist(), strict=True)) == want  # not the closing "
    # a row's first token has no context before it
    assert len(at.find_contexts([tok400.encode("تيمي ذهب")], at.token_bytes(tok400), names)) == 0


def test_row_text_maps_byte_pieces(tok400):
    tb = at.token_bytes(tok400)
    text = "ب😀 ليلي"  # the emoji is four byte pieces
    ids = tok400.encode(text)
    rt = at.row_text(ids, tb)
    assert rt.text == text
    assert rt.owner[1] == 1 and rt.start[1] == 1  # the emoji's first byte piece owns it
    assert (rt.start[2:5] == -1).all()  # its other byte pieces start no character
    assert at.row_text([3, *ids], tb).text == "\x00" + text  # </s>: a story boundary


def test_row_text_owners_at_a_cut_character():
    """Invalid UTF-8 (a window cut inside a character): each U+FFFD is owned by the token that
    started the broken character and what a breaking byte starts by its own token."""
    tb = [b"\xc2", b"\xbb", b" x", b"!"]  # "»" is C2 BB
    cases = {
        (0, 1, 2): ("» x", [0, 2, 2]),
        (1, 2): ("\ufffd x", [0, 1, 1]),  # starts after the lead byte
        (3, 0): ("!\ufffd", [0, 1]),  # ends before the continuation byte
        (0, 2): ("\ufffd x", [0, 1, 1]),  # the space is the next token's, not the lead byte's
        (0, 0, 1): ("\ufffd»", [0, 1]),  # "»" is the second lead byte's
    }
    for ids, (text, owner) in cases.items():
        rt = at.row_text(ids, tb)
        assert (rt.text, rt.owner.tolist()) == (text, owner), ids


# --- the name-slot logit difference under ablation (sae ablate) ---------------------------------


def test_name_logit_diff_unablated_is_attributions_and_ablating_every_live_feature_moves_it(
    tok400, demo_data
):
    from sae.ablate import FeatureAblation, name_logit_diff, name_slot_logit_diffs
    from sae.analysis.dashboards import read_rows

    L = 1
    model = _model(tok400.vocab_size, D=32, F=64, layers=2, seed=6)
    sae = _sae(64, 40, seed=1)
    readers = {d: read_rows(demo_data[d], split="train", max_rows=24, batch_size=8)
            for d in ("translated", "native")}  # fmt: skip
    batches = [b for d in readers.values() for b in d]
    att = at.attribute(model, sae, L, batches, tok400, at.demo_contrasts(tok400))
    r = att["names"]
    assert r.n(0) > 5 and r.n(1) > 5
    nothing = FeatureAblation(sae, L, [])
    label, base, same, rows = name_slot_logit_diffs(model, tok400, nothing, batches)
    # the same contexts, in the same order, and attribute's own logit difference at each
    assert rows == 48 and np.array_equal(label, r.contexts.label)
    assert np.abs(base - r.logit_diff).max() < 1e-5 and np.abs(same - base).max() < 1e-5
    got = name_logit_diff(model, tok400, nothing, batches, resamples=200)
    assert abs(got["baseline"]["value"] - r.balanced_mean(r.logit_diff)) < 1e-5
    assert got["contexts"] == {"english": r.n(0), "arabic": r.n(1)}
    assert abs(got["difference"]["value"]) < 1e-5

    live = np.flatnonzero(att.live)
    assert 0 < len(live) < 40
    every = name_logit_diff(model, tok400, FeatureAblation(sae, L, live), batches, resamples=200)
    assert every["baseline"] == got["baseline"]
    d = every["difference"]
    assert d["value"] == pytest.approx(every["ablated"]["value"] - every["baseline"]["value"])
    assert abs(d["value"]) > 1e-2 and d["n"] == r.n(0) + r.n(1)
    lo, hi = d["ci95"]
    assert lo <= d["value"] <= hi and (lo > 0 or hi < 0)  # paired: clear of zero
    for lab in ("english", "arabic"):
        bl = every["by_label"][lab]
        assert bl["difference"] == pytest.approx(bl["ablated"] - bl["baseline"])
    means = [every["by_label"][lab]["baseline"] for lab in ("english", "arabic")]
    assert every["baseline"]["value"] == pytest.approx(np.mean(means))  # balanced


# --- saved and loaded --------------------------------------------------------------------------


def test_an_attribution_saved_and_loaded_is_the_same_and_other_contrasts_are_refused(
    tok400, demo_data, tmp_path
):
    from sae.analysis.dashboards import read_rows

    model = _model(tok400.vocab_size, D=32, F=64, layers=2, seed=6)
    sae = _sae(64, 40, seed=1)
    rows = {d: read_rows(demo_data[d], split="train", max_rows=24, batch_size=8)
            for d in ("translated", "native")}  # fmt: skip
    batches = [b for d in rows.values() for b in d]
    contrasts = at.demo_contrasts(tok400)
    att = at.attribute(model, sae, 1, batches, tok400, contrasts)
    att.meta.update(model="m", data=["a", "b"])
    path = att.save(tmp_path / "attribution.npz")
    got = at.Attribution.load(path, at.demo_contrasts(tok400))  # rebuilt, as match does
    assert got.n_tokens == att.n_tokens and got.meta == att.meta
    assert np.array_equal(got.active_count, att.active_count)
    assert got.active_count.dtype == att.active_count.dtype
    for a, b in zip(att.results, got.results, strict=True):
        assert a.contrast.name == b.contrast.name and a.contrast.labels == b.contrast.labels
        assert len(a.contexts) > 0 and a.contexts.examples
        for k in ("row", "pos", "label", "form", "token"):
            x, y = getattr(a.contexts, k), getattr(b.contexts, k)
            assert np.array_equal(x, y) and x.dtype == y.dtype, k
        for k in ("skipped", "outside_set", "examples"):
            assert getattr(a.contexts, k) == getattr(b.contexts, k), k
        for k in at._RESULT_ARRAYS:
            x, y = getattr(a, k), getattr(b, k)
            assert np.array_equal(x, y) and x.dtype == y.dtype, k
        assert a.max_residual == b.max_residual and a.component_names == b.component_names
    assert got.summary(texts=tsea.display_texts(tok400)) == att.summary(
        texts=tsea.display_texts(tok400)
    )

    names = demo_word_lists()
    fewer = {"english": names["english_names"][1:], "arabic": list(names["arabic_names"])}
    with pytest.raises(UserError, match="names contrast's first-token sets are not the ones"):
        at.Attribution.load(path, at.demo_contrasts(tok400, fewer))
    with pytest.raises(UserError, match="holds the contrasts"):
        at.Attribution.load(path, [at.quote_contrast(tok400)])
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a saved attribution"):
        at.Attribution.load(tmp_path / "bad.npz", contrasts)
    for r in att.results:  # what the pipeline's ablation reads: the balanced mean part
        ns = [(r.contexts.label == j).sum() for j in (0, 1)]
        want = np.mean([r.part_sum[j] / ns[j] for j in (0, 1) if ns[j]], axis=0)
        np.testing.assert_allclose(at.saved_mean_parts(path, r.contrast.name), want, rtol=1e-6)
        np.testing.assert_allclose(r.mean_parts(), want, rtol=1e-6)
    count, n, meta = at.saved_counts(path)  # what tsea-compare reads: no contrasts rebuilt
    assert np.array_equal(count, att.active_count) and count.dtype == att.active_count.dtype
    assert n == att.n_tokens and meta == att.meta
    with pytest.raises(UserError, match="not a saved attribution"):
        at.saved_counts(tmp_path / "bad.npz")


def test_coverage_takes_the_fewest_top_features_carrying_the_share_of_the_positive_part():
    parts = np.asarray([4.0, -8.0, 1.0, 3.0, 0.0, 1.0])  # positive: 9 in all
    assert at.coverage_features(parts, 0.7) == [0, 3]  # 4 + 3 = 7 >= 6.3
    assert at.coverage_features(parts, 7 / 9) == [0, 3]  # exactly reached
    assert at.coverage_features(parts, 0.8) == [0, 2, 3]  # 8 >= 7.2; ties: the lower id first
    assert at.coverage_features(parts, 1.0) == [0, 2, 3, 5]  # never a negative or zero part
    assert at.coverage_features(-np.abs(parts), 0.8) == []
    for bad in (0.0, 1.5):
        with pytest.raises(UserError, match="must be in"):
            at.coverage_features(parts, bad)


@pytest.mark.parametrize(("arch", "kw"), SAES, ids=[a for a, _ in SAES])
def test_attributes_firing_count_is_what_tsea_compare_and_ablate_count_on_the_same_batches(
    arch, kw, tok400, demo_data
):
    """attribute's active_count and n_tokens are, to the integer, what `firing_count_fn`
    (tsea-compare's liveness and frequency, `_live`) counts over the same batches, and what
    `sae.evaluate.firing_counts` (ablate's live features) counts over them too. ablate reads
    other batches (a seeded sample of --rows per source, in 8s): it is not handed attribute's."""
    from sae.analysis.dashboards import firing_count_fn, read_rows
    from sae.evaluate import firing_counts

    model = _model(tok400.vocab_size, D=32, F=64, layers=2, seed=6)
    sae = _sae(64, 40, arch, seed=1, **kw)
    read = lambda d: read_rows(demo_data[d], split="train", max_rows=20, batch_size=8)  # noqa: E731
    batches = [b for d in ("translated", "native") for b in read(d)]
    assert sorted({len(b) for b in batches}) == [4, 8]  # a short last batch of each source
    att = at.attribute(model, sae, 1, batches, tok400, at.demo_contrasts(tok400))
    fires = firing_count_fn(model, sae, 1)
    assert np.array_equal(att.active_count, sum(fires(b) for b in batches))
    assert att.n_tokens == sum(b.size for b in batches)
    # firing_counts reads rows with their next tokens [B, T + 1] and drops the last column
    with_next = iter([np.concatenate([b, b[:, -1:]], 1) for b in batches])
    count, tokens = firing_counts(model, sae, 1, with_next)
    assert np.array_equal(att.active_count, count) and att.n_tokens == tokens
    assert 0 < att.live.sum() < 40


# --- the rows read -----------------------------------------------------------------------------


def _all_rows(datadir, split: str) -> np.ndarray:
    """Every row of a split [R, T] (without its shifted target), in order: one-row batches, which
    no loader leaves a remainder of."""
    from jaxlm.data.pipeline import make_loader

    loader = make_loader([(str(datadir), 1.0)], split=split, batch_size=1, seed=0, num_epochs=1,
                         shuffle=False)  # fmt: skip
    return np.concatenate([b["tokens"][:, :-1] for b in loader])


def test_read_rows_reads_every_row_in_order_its_last_batch_smaller(demo_data):
    """`read_rows` yields the first min(max_rows, rows) rows, in order, in batches of
    `batch_size` but the last: the loader's remainder is read, not dropped."""
    from sae.analysis.dashboards import read_rows, rows_read

    def sizes(n: int, b: int) -> list[int]:
        b = min(b, n)
        return [b] * (n // b) + [n % b] * (n % b > 0)

    assert sizes(13, 5) == [5, 5, 3]
    for d in (demo_data["translated"], demo_data["native"]):  # 176 and 10 held-out rows
        want = _all_rows(d, "validation")
        R = len(want)
        for max_rows, b in ((13, 5), (R, 32), (R, 7), (R + 100, 3), (R - 1, R), (R, 1)):
            got = list(read_rows(d, split="validation", max_rows=max_rows, batch_size=b))
            n = min(max_rows, R)
            assert [len(g) for g in got] == sizes(n, b), (R, max_rows, b)
            assert rows_read(d, split="validation", max_rows=max_rows) == n
            assert np.array_equal(np.concatenate(got), want[:n])


def test_attribute_reads_every_row_when_the_batch_size_does_not_divide_them(tok400, demo_data):
    """attribute over batches of 32 with a short last one finds the contexts, and counts the
    tokens, of every row: those of one batch holding them all."""
    from sae.analysis.dashboards import read_rows

    d = demo_data["translated"]
    R = len(_all_rows(d, "validation"))
    assert R % 32, R  # 176 held-out rows: 5 batches of 32 and one of 16
    model = _model(tok400.vocab_size, D=32, F=64, layers=2, seed=6)
    sae = _sae(64, 40, seed=1)
    contrasts = at.demo_contrasts(tok400)
    read = lambda b: list(read_rows(d, split="validation", max_rows=10_000, batch_size=b))  # noqa: E731
    batched, whole = (at.attribute(model, sae, 1, read(b), tok400, contrasts) for b in (32, R))
    assert batched.meta["rows"] == whole.meta["rows"] == R
    assert batched.n_tokens == whole.n_tokens == R * 32  # seq_len 32
    # contexts in the last, short batch's rows: the rows a dropped remainder would lose
    assert any((r.contexts.row >= R - R % 32).any() for r in batched.results)
    for a, b in zip(batched.results, whole.results, strict=True):
        for k in ("row", "pos", "label", "form", "token"):
            x, y = getattr(a.contexts, k), getattr(b.contexts, k)
            assert np.array_equal(x, y), (a.contrast.name, k)
    # the same positions fire, but for one whose activation a batch's shape moves across zero
    assert np.abs(batched.active_count - whole.active_count).max() <= 1


# --- the TSEA contrast --------------------------------------------------------------------------


def test_contrast_on_a_crafted_projection_and_dead_features_left_out():
    V, D, F = 80, 16, 24
    model = _model(V, D, F, layers=1, seed=5)
    rng = np.random.default_rng(5)
    W_dec = rng.normal(size=(12, F)).astype(np.float32)
    a, b = np.array([4, 5, 6, 9]), np.array([9, 30, 31])  # 9 is in both: dropped from both
    proj = tsea.feature_vocab_projection(model, W_dec, 0).astype(np.float64)
    want = (proj[:, [4, 5, 6]].mean(1) - proj[:, [30, 31]].mean(1)) / proj.std(1)
    live = np.ones(12, bool)
    best = int(np.argmax(want))
    live[best] = False
    res = tsea.tsea(model, W_dec, 0, {"a": a, "b": b}, contrasts=[("a", "b")], live=live,
                    n_null=64, chunk=5)  # fmt: skip
    np.testing.assert_allclose(res.contrast[0], want, rtol=1e-4, atol=1e-5)
    assert res.null_contrast.shape == (1, 64)
    s = res.contrast_summary(0, top=3)
    assert s["n_live"] == 11 and best not in [e["feature"] for e in s["top_positive"]]
    assert s["top_positive"][0]["feature"] == int(np.argsort(-want)[1])
    assert abs(s["mean"] - want[live].mean()) < 1e-5
    summary = res.summary(top=20)
    assert summary["sets"]["a"]["n_live"] == 11
    assert best not in [e["feature"] for e in summary["sets"]["a"]["top_features"]]
    assert set(summary["contrasts"]) == {"a-b"}
    json.dumps(summary)
    with pytest.raises(UserError, match="no token set 'c'"):
        tsea.tsea(model, W_dec, 0, {"a": a, "b": b}, contrasts=[("a", "c")], n_null=0)


def test_word_start_sets_read_multi_token_names(tok400):
    words = demo_word_lists()["english_names"]
    starts = tsea.word_start_set(tok400, words)
    spaced = [tok400.encode(" " + w) for w in words]  # "▁" + "X..." where "▁X" is no piece
    lone = [ids for ids in spaced if tok400.id_to_piece(ids[0]) == "\u2581"]
    assert lone  # the lone space piece is not the word's start: the next piece is
    want = {ids[1] if ids in lone else ids[0] for ids in spaced}
    assert set(starts.tolist()) == want | {tok400.encode(w)[0] for w in words}
    with pytest.raises(UserError, match="is empty"):  # no name is a whole piece at 400 pieces
        tsea.build_token_sets(tok400, words={"en": words})


# --- matching -----------------------------------------------------------------------------------


def test_matching_recovers_a_permuted_copy():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(50, 32))
    perm = rng.permutation(50)
    W2 = W[perm] * rng.uniform(0.5, 2.0, (50, 1))  # rescaled rows: the cosine ignores norms
    m = matching.match_features(W, W2)
    assert np.abs(m.cosine - 1).max() < 1e-9
    assert np.array_equal(perm[m.after], m.before)  # after row j is before row perm[j]
    for f in range(50):
        assert m.counterpart(f)[0] == int(np.flatnonzero(perm == f)[0])
    live = np.ones(50, bool)
    live[[3, 7]] = False
    m = matching.match_features(W, W2, live_before=live)
    assert m.n_before == 48 and 3 not in m.before and len(m.before) == 48
    assert matching.chance_cosine(50, 50, 32) < 0.9


# --- the CLI ------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    from jaxlm.cli import main

    return main(["sae", *argv])


def _each_refused_in_one_line(bad, capsys) -> None:
    """Each (argv, message): exit 2 and one line of stderr holding the message."""
    for argv, msg in bad:
        assert _cli(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], lines


def _saved(tok, demo_data, tmp_path):
    """A model (tmp_path/m), its layer-1 SAE (s) and that SAE's features permuted (s2); the
    permutation, the SAE, and the --data flags of 24 rows of each demo corpus."""
    from jaxlm.checkpoint import save_model

    model = _model(tok.vocab_size, D=32, F=64, layers=2, seed=6)
    save_model(tmp_path / "m", model, tokenizer=str(demo_data["tok"]))
    sae = _sae(64, 40, seed=1)
    save_sae(tmp_path / "s", sae, layer=1)
    perm = np.random.default_rng(1).permutation(40)
    copy = _sae(64, 40, seed=1)
    _, t = sae.inference_tensors()
    t = {k: np.asarray(v) for k, v in t.items()}
    copy.load_tensors({"W_enc": t["W_enc"][:, perm], "b_enc": t["b_enc"][perm],
                       "W_dec": t["W_dec"][perm], "b_dec": t["b_dec"]})  # fmt: skip
    save_sae(tmp_path / "s2", copy, layer=1)
    data = ["--data", str(demo_data["translated"]), "--data", str(demo_data["native"]),
            "--split", "train", "--rows", "24"]  # fmt: skip
    return perm, sae, data


def test_cli_pulse_and_bad_input(tok400, demo_data, tmp_path, capsys):
    perm, sae, data = _saved(tok400, demo_data, tmp_path)
    m, s = str(tmp_path / "m"), str(tmp_path / "s")
    assert _cli(["attribute", "--model", m, "--sae", s, *data, "--dashboards",
                 "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    out = json.loads((tmp_path / "a/attribution.json").read_text())
    names, dlg = out["contrasts"]["names"], out["contrasts"]["dialogue"]
    assert names["contexts"]["english"] > 5 and names["contexts"]["arabic"] > 5
    assert dlg["contexts"]["english_style"] > 0 and dlg["contexts"]["arabic_style"] > 0
    assert names["max_decomposition_residual"] < 1e-9
    assert out["rows"] == 48 and (tmp_path / "a/attribution.png").stat().st_size > 0
    listed = names["top_features"] + names["bottom_features"]
    assert listed and all("/" in e["dashboard_contexts_at_targets"] for e in listed)
    assert (tmp_path / "a/dashboards/dashboards.html").is_file()
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["names"]["error_share"] == names["error_share"]

    assert _cli(["match", "--before", m, s, "--after", m, str(tmp_path / "s2"), *data,
                 "--out", str(tmp_path / "x")]) == 0  # fmt: skip
    rep = json.loads((tmp_path / "x/match.json").read_text())
    assert rep["matched_above_threshold"] == rep["live_before"] == rep["live_after"]
    for row in rep["top_before"]:  # the permuted copy: every feature found, same behaviour
        assert row["has_counterpart"] and row["assigned"] == int(
            np.flatnonzero(perm == row["feature"])[0]
        )
        assert row["cosine"] == pytest.approx(1.0, abs=1e-6)
        assert row["after"]["part"] == pytest.approx(row["before"]["part"], abs=1e-5)
    assert (tmp_path / "x/match.png").stat().st_size > 0

    # TSEA with dead features found on held-out rows
    assert _cli(["tsea", "--model", m, "--sae", s, "--regex", "q=[«»]", "--regex", 'l="',
                 "--contrast", "l:q", *data, "--out", str(tmp_path / "t")]) == 0  # fmt: skip
    t = json.loads((tmp_path / "t/tsea.json").read_text())
    assert t["dead_features_from"].startswith("--data train rows")
    assert t["contrasts"]["l-q"]["n_live"] == 40 - t["n_dead"]
    # without --data: the training sparsity saved beside the SAE (log10(freq + 1e-10))
    log_sparsity = np.full(40, -2.0)
    log_sparsity[[0, 5, 9]] = -10.0
    save_sae(tmp_path / "s3", sae, layer=1, log_sparsity_s=log_sparsity)
    assert _cli(["tsea", "--model", m, "--sae", str(tmp_path / "s3"), "--regex", "q=[«»]",
                 "--out", str(tmp_path / "t3")]) == 0  # fmt: skip
    t = json.loads((tmp_path / "t3/tsea.json").read_text())
    assert "sparsity.safetensors (training)" in t["dead_features_from"] and t["n_dead"] == 3
    assert t["sets"]["q"]["n_live"] == 37
    assert not {0, 5, 9} & {e["feature"] for e in t["sets"]["q"]["top_features"]}
    capsys.readouterr()
    en = tmp_path / "en.txt"
    en.write_text("ليلي\n")
    o = str(tmp_path / "o")  # a refused run still takes its output's lock beside it
    bad = [
        (["attribute", "--model", m, "--sae", s, *data, "--names", "x=/nope.txt", "--out", o],
         "nope.txt: cannot read"),
        (["attribute", "--model", m, "--sae", s, *data, "--names", f"x={en}", "--out", o],
         "give exactly two lists (positive first), got 1"),
        (["attribute", "--model", m, "--sae", s, "--data", str(tmp_path), "--out", o],
         "not a prepared DATADIR"),
        (["attribute", "--model", m, "--sae", s, *data, "--top", "0", "--out", o],
         "--top must be >= 1"),
        (["match", "--before", m, s, "--after", m, s, *data, "--threshold", "2", "--out", o],
         "a cosine is in [-1, 1]"),
        (["tsea", "--model", m, "--sae", s, "--regex", "q=«", "--contrast", "q", "--out", o],
         "expected SET_A:SET_B"),
    ]  # fmt: skip
    _each_refused_in_one_line(bad, capsys)


def test_match_reads_the_attributions_attribute_saved_and_writes_the_same(
    tok400, demo_data, tmp_path, capsys
):
    import shutil

    data = _saved(tok400, demo_data, tmp_path)[2]
    m, s, s2 = (str((tmp_path / x).resolve()) for x in ("m", "s", "s2"))
    a, a2 = str(tmp_path / "a"), str(tmp_path / "a2")
    for sae_dir, out in ((s, a), (s2, a2)):
        assert _cli(["attribute", "--model", m, "--sae", sae_dir, *data, "--top", "3",
                     "--out", out]) == 0  # fmt: skip
    pair = ["--before", m, s, "--after", m, s2, *data]
    assert _cli(["match", *pair, "--out", str(tmp_path / "x")]) == 0
    assert _cli(["match", *pair, "--attribution-before", a, "--attribution-after", a2,
                 "--out", str(tmp_path / "y")]) == 0  # fmt: skip
    x, y = tmp_path / "x", tmp_path / "y"
    files = sorted(p.relative_to(x) for p in x.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(y) for p in y.rglob("*") if p.is_file())
    for f in ("match.json", "before/attribution.json", "after/attribution.json"):
        assert (x / f).read_text() == (y / f).read_text(), f  # exactly: the arrays round-trip
    capsys.readouterr()

    old = tmp_path / "old"  # an attribute output of an earlier jaxlm: no arrays
    shutil.copytree(a, old)
    (old / "attribution.npz").unlink()
    short = _fewer_rows(a, tmp_path / "short")
    native = ["--data", str(demo_data["native"]), "--split", "train", "--rows", "24"]
    t, n = (demo_data[x].resolve() for x in ("translated", "native"))
    o = str(tmp_path / "o")
    bad = [
        (["match", *pair, "--attribution-before", a2, "--out", o],
         f"--attribution-before {a2} was attributed from other inputs than --before"),
        (["match", *pair, "--attribution-after", a, "--out", o], f'(sae "{s}" -> "{s2}")'),
        (["match", "--before", m, s, "--after", m, s2, *native, "--attribution-before", a,
          "--out", o], f'(data ["{t}", "{n}"] -> ["{n}"])'),
        (["match", *pair, "--attribution-before", str(old), "--out", o],
         "no attribution.npz (an earlier jaxlm's output)"),
        (["match", *pair, "--attribution-before", str(tmp_path / "x"), "--out", o],
         "not a `jaxlm sae attribute` output"),
        (["match", *pair, "--layer", "0", "--attribution-before", a, "--out", o],
         "attributes layer 1, this reads layer 0"),
        (["match", *pair, "--attribution-before", short, "--out", o],
         f"--attribution-before {short}: attributes 40 rows, these flags read 48: attribute again"),
    ]  # fmt: skip
    _each_refused_in_one_line(bad, capsys)


def _fewer_rows(src: str, dst) -> str:
    """A copy of `sae attribute`'s output `src` whose attribution.npz records 40 rows read, as
    an earlier jaxlm's did with the same flags (it dropped each source's last partial batch)."""
    import shutil

    shutil.copytree(src, dst)
    npz = dst / "attribution.npz"
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays[at.HEADER].item())
    header["meta"]["rows"] = 40
    arrays[at.HEADER] = np.asarray(json.dumps(header, ensure_ascii=False))
    with open(npz, "wb") as f:
        np.savez(f, **arrays)
    return str(dst)


def test_tsea_compare_reads_the_firing_counts_attribute_saved_and_writes_the_same(
    tok400, demo_data, tmp_path, capsys
):
    data = _saved(tok400, demo_data, tmp_path)[2]
    m, s, s2 = (str((tmp_path / x).resolve()) for x in ("m", "s", "s2"))
    a, a2 = str(tmp_path / "a"), str(tmp_path / "a2")
    for sae_dir, out in ((s, a), (s2, a2)):  # other --names than tsea-compare's: no matter
        assert _cli(["attribute", "--model", m, "--sae", sae_dir, *data, "--top", "3",
                     "--names", f"english={_words(tmp_path, 'english_names')}",
                     "--names", f"arabic={_words(tmp_path, 'arabic_names')}",
                     "--out", out]) == 0  # fmt: skip
    sets = ["--regex", 'quote=["«]', "--regex", "space=^ ", "--contrast", "quote:space"]
    pair = ["--before", m, s, "--after", m, s2, *sets, "--null-directions", "8", *data]
    saved = ["--attribution-before", a, "--attribution-after", a2]
    assert _cli(["tsea-compare", *pair, "--out", str(tmp_path / "x")]) == 0
    assert _cli(["tsea-compare", *pair, *saved, "--out", str(tmp_path / "y")]) == 0
    x, y = tmp_path / "x", tmp_path / "y"
    files = sorted(str(p.relative_to(x)) for p in x.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(y)) for p in y.rglob("*") if p.is_file())
    for f in files:  # exactly; the identity names the flags, and an .npz its writing time
        if f.endswith(".npz"):
            with np.load(x / f) as p, np.load(y / f) as q:
                assert p.files == q.files and "live" in p.files and "frequency" in p.files
                for k in p.files:
                    assert np.array_equal(p[k], q[k]), (f, k)
        elif f != "identity.json":
            assert (x / f).read_bytes() == (y / f).read_bytes(), f
    cmp = json.loads((x / "tsea_compare.json").read_text())
    assert 0 < cmp["before"]["n_dead"] < 40 and cmp["after"]["n_dead"] == cmp["before"]["n_dead"]
    capsys.readouterr()

    o, short = str(tmp_path / "o"), _fewer_rows(a2, tmp_path / "short")
    bad = [
        (["tsea-compare", *pair, "--rows", "12", *saved, "--out", o], "(rows 24 -> 12)"),
        (["tsea-compare", *pair, "--batch-size", "8", *saved, "--out", o],
         "(batch_size 32 -> 8)"),
        (["tsea-compare", *pair, "--attribution-before", a2, "--out", o],
         f'--attribution-before {a2} was attributed from other inputs than --before and these '
         f'rows (sae "{s2}" -> "{s}")'),
        (["tsea-compare", *pair[:6], *sets, "--attribution-after", a2, "--out", o],
         "(data ["),
        (["tsea-compare", *pair, "--layer", "0", *saved, "--out", o],
         "attributes layer 1, this reads layer 0"),
        (["tsea-compare", *pair, "--attribution-after", str(x), "--out", o],
         "not a `jaxlm sae attribute` output"),
        (["tsea-compare", *pair, "--attribution-after", short, "--out", o],
         f"--attribution-after {short}: attributes 40 rows, these flags read 48: attribute again"),
    ]  # fmt: skip
    _each_refused_in_one_line(bad, capsys)


def _words(tmp_path, key: str) -> str:
    """The demo's `key` word list, less its first word, as a file."""
    path = tmp_path / f"{key}.txt"
    path.write_text("\n".join(demo_word_lists()[key][1:]) + "\n", encoding="utf-8")
    return str(path)


def test_several_saes_in_one_pass_write_what_each_alone_writes(tok400, demo_data, tmp_path,
                                                              capsys):  # fmt: skip
    """`sae attribute --sae A --sae B` (one forward a batch for both layers) writes OUT/layer-N
    for each: the arrays, summary and dashboards `--sae it --out DIR` writes alone, and the same
    identity, so the one-SAE command finds it done. Two SAEs on one layer, or --layer with
    several, are refused."""
    import numpy as np

    data = _saved(tok400, demo_data, tmp_path)[2]
    m, s = str(tmp_path / "m"), str(tmp_path / "s")
    save_sae(tmp_path / "s0", _sae(64, 24, seed=3), layer=0)
    s0 = str(tmp_path / "s0")
    for sae_dir, out in ((s, "one1"), (s0, "one0")):
        assert _cli(["attribute", "--model", m, "--sae", sae_dir, *data, "--dashboards", "--top",
                     "3", "--out", str(tmp_path / out)]) == 0  # fmt: skip
    assert _cli(["attribute", "--model", m, "--sae", s, "--sae", s0, *data, "--dashboards",
                 "--top", "3", "--out", str(tmp_path / "both")]) == 0  # fmt: skip
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert [x["out"] for x in lines] == [str(tmp_path / "both/layer-1"),
                                         str(tmp_path / "both/layer-0")]  # fmt: skip
    for layer, one in ((1, "one1"), (0, "one0")):
        a, b = tmp_path / one, tmp_path / f"both/layer-{layer}"
        with np.load(a / "attribution.npz") as za, np.load(b / "attribution.npz") as zb:
            assert sorted(za.files) == sorted(zb.files)
            for k in za.files:
                if k != "header.json":
                    assert np.array_equal(za[k], zb[k]), (layer, k)
        ja, jb = (json.loads((d / "attribution.json").read_text()) for d in (a, b))
        assert ja == jb and ja["contrasts"]["names"]["top_features"]
        da, db = (json.loads((d / "dashboards/dashboards.json").read_text()) for d in (a, b))
        assert da["features"] == db["features"] and da["features"]
        # the same identity: the one-SAE command into the several's output finds it done
        sae_dir = s if layer == 1 else s0
        assert _cli(["attribute", "--model", m, "--sae", sae_dir, *data, "--dashboards", "--top",
                     "3", "--out", str(b)]) == 0  # fmt: skip
        assert "already made with these settings" in capsys.readouterr().err
    o = str(tmp_path / "o")
    bad = [
        (["attribute", "--model", m, "--sae", s, "--sae", s, *data, "--out", o],
         "both read layer 1; one per layer"),
        (["attribute", "--model", m, "--sae", s, "--sae", s0, "--layer", "1", *data, "--out", o],
         "--layer: give it with one --sae only"),
    ]  # fmt: skip
    _each_refused_in_one_line(bad, capsys)
