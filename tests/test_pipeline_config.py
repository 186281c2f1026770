"""The pipeline's corpus settings: `corpus.english_name_share` reaches the translated-style sets
only when set, is checked in one line, and leaves the corpus stage of an existing workdir as it
was at its default (the same fingerprint, so nothing reruns after an upgrade)."""

import json
from pathlib import Path

import pytest

from jaxlm.errors import UserError
from jaxlm.pipeline.config import load
from jaxlm.pipeline.engine import Context, fingerprint
from jaxlm.pipeline.method import Method

TINY = {"n_translated": 200, "eval_stories": 10}  # 2 native and control stories (1%)


def _corpus(tmp_path, **corpus) -> list[str]:
    """The commands the corpus stage runs (for real: the tiny sets take a moment)."""
    cfg = load(None, [{"corpus": {**TINY, **corpus}}])
    ctx = Context(tmp_path, overwrite=False, log=lambda *_: None, stage="corpus")
    Method(cfg, tmp_path, None)._corpus(ctx)
    return ctx.commands


def _corpus_stage(**corpus):
    cfg = load(None, [{"corpus": corpus}] if corpus else None)
    return next(s for s in Method(cfg, Path("run"), None)._data_stages() if s.name == "corpus")


def test_the_share_reaches_the_translated_style_sets_only_when_set(tmp_path):
    assert not any("--english-name-share" in c for c in _corpus(tmp_path / "default"))
    commands = _corpus(tmp_path / "half", english_name_share=0.5)
    flagged = {c.split("--out ")[1].split()[0].rsplit("/", 1)[1] for c in commands
               if c.endswith("--english-name-share 0.5")}  # fmt: skip
    assert flagged == {"translated.jsonl", "control.jsonl", "eval_translated.jsonl"}
    assert len(commands) == 5
    ident = tmp_path / "half" / "corpus" / "translated.jsonl.identity.json"
    assert json.loads(ident.read_text())["identity"]["english_name_share"] == 0.5


def test_the_corpus_stage_at_the_default_is_what_it_was_before_the_option():
    """The settings and fingerprint of the default corpus stage, as the pipeline computed them
    before `english_name_share` existed (at 74ef84e): an existing runs/demo keeps its corpus and
    every stage after it."""
    stage = _corpus_stage()
    assert stage.settings == {"corpus": {"kind": "demo", "n_translated": 20000,
                                         "native_fraction": 0.01, "eval_stories": 600, "seed": 0,
                                         "translated": None, "english": None, "native": None,
                                         "field": "text"}}  # fmt: skip
    assert fingerprint(stage, {}) == "1ae313dd25450cd3"
    assert _corpus_stage(english_name_share=1).settings == stage.settings
    half = _corpus_stage(english_name_share=0.5)
    assert half.settings["corpus"]["english_name_share"] == 0.5
    assert fingerprint(half, {}) != fingerprint(stage, {})


FILES = {"kind": "files", "translated": "t.jsonl", "native": "n.jsonl"}
RANGE = r"must be in \[0, 1\]$"


@pytest.mark.parametrize(
    "corpus, says",
    [
        ({"english_name_share": 1.5}, rf"config: corpus.english_name_share=1.5 {RANGE}"),
        ({"english_name_share": -0.1}, rf"config: corpus.english_name_share=-0.1 {RANGE}"),
        ({**FILES, "english_name_share": 0.5}, "config: corpus.english_name_share applies to "),
    ],
)
def test_a_share_the_corpus_cannot_use_is_refused_in_one_line(corpus, says):
    with pytest.raises(UserError, match=says) as e:
        load(None, [{"corpus": corpus}])
    assert "\n" not in str(e.value)
    load(None, [{"corpus": {**corpus, "english_name_share": 1.0}}])  # the default is fine


def _ablation_stage(**sae):
    cfg = load(None, [{"sae": sae}] if sae else None)
    return Method(cfg, Path("run"), None)._ablation_stage("ts-1m")


def test_the_ablations_pick_is_in_its_fingerprint_and_a_bad_coverage_is_one_line():
    """A fixed number of top features by default; `sae.ablation_coverage` replaces it (a changed
    pick reruns the ablation); out of (0, 1] it is refused before anything runs."""
    top8, cov = _ablation_stage(), _ablation_stage(ablation_coverage=0.8)
    assert top8.settings["k"] == 8 and "coverage" not in top8.settings
    assert cov.settings["coverage"] == 0.8 and "k" not in cov.settings
    up = {"analysis-pretrain-ts-1m": "same"}
    assert fingerprint(cov, up) != fingerprint(top8, up)
    assert fingerprint(_ablation_stage(ablation_coverage=0.5), up) != fingerprint(cov, up)
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(UserError, match=rf"sae.ablation_coverage={bad} must be in \(0, 1\]"):
            load(None, [{"sae": {"ablation_coverage": bad}}])


class _Recorder:
    """A Context that records the commands a stage would run instead of running them."""

    def __init__(self):
        self.argv: list[list[str]] = []

    def jaxlm(self, *args, **_):
        self.argv.append(list(args))


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("coverage", [None, 0.8])
def test_the_ablation_samples_as_the_samples_stage_and_matches_random_counts_per_layer(
    tmp_path, monkeypatch, coverage
):
    """Both ablation runs sample with the samples section's n, temperature, top-k and seed (a
    seed set there once went unused: the ablation sampled seed 0), and the random control draws
    as many live features at each layer as the top set has there."""
    import numpy as np

    import jaxlm.pipeline.method as method
    import sae.analysis.attribution as at

    cfg = load(None, [{"samples": {"n": 12, "temperature": 0.5, "top_k": 7, "seed": 3000},
                       "sae": {"layers": [-1, 0], "ablation_features": 2,
                               "ablation_coverage": coverage}}])  # fmt: skip
    m = Method(cfg, tmp_path, None)
    monkeypatch.setattr(Method, "sae_layers", lambda self, label: [7, 0])
    parts = {0: [0.5, 0.3, 0.2, -1.0], 7: [0.9, 0.0, 0.06, 0.04]}  # per layer, by feature
    for layer, p in parts.items():
        d = m.analysis_dir("pretrain-ts-1m", layer)
        d.mkdir(parents=True)
        top = [{"feature": int(f), "part": p[f], "share": 0.1} for f in np.argsort(p)[::-1]]
        (d / "attribution.json").write_text(json.dumps({"layer": layer, "contrasts": {
            "names": {"top_features": top}}}))  # fmt: skip
    monkeypatch.setattr(at, "saved_mean_parts", lambda path: np.asarray(parts[int(
        path.parent.name.removeprefix("layer-"))]))  # fmt: skip
    monkeypatch.setattr(method, "ablation_summary", lambda d, feats: {"features_top": feats})
    ctx = _Recorder()
    result = m._ablation_stage("ts-1m").run(ctx)
    top, rand = ctx.argv
    for argv in (top, rand):
        assert argv[:2] == ["sae", "ablate"]
        assert [_flag(argv, f) for f in ("--n", "--temperature", "--top-k", "--sample-seed")] == [
            "12", "0.5", "7", "3000"]  # fmt: skip
    # coverage 0.8: layer 0 needs 0.5 + 0.3 of 1.0, layer 7 0.9 of 1.0; top 2: two each
    want = {"0": [0, 1], "7": [0]} if coverage else {"0": [0, 1], "7": [0, 2]}
    assert result["features_top"] == want
    assert [_flag(top, "--features"), top[top.index("--features") + 3]] == [
        ",".join(map(str, want["0"])), ",".join(map(str, want["7"]))]  # fmt: skip
    assert _flag(rand, "--random") == ",".join(str(len(want[k])) for k in ("0", "7"))
    assert "selection" in result and ("80%" in result["selection"]) == bool(coverage)
