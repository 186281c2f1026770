"""Artifact metrics (`jaxlm eval artifacts`): hand-counted texts, the demo's two styles, real
native stories (AraStories) against the shared name lists, the bootstrap, and the command."""

import json

import pytest

from jaxlm.cli import main
from jaxlm.data.demo_corpus import generate
from jaxlm.errors import UserError
from jaxlm.eval.artifacts import (
    NameLists,
    artifact_metrics,
    bootstrap,
    count_dialogue,
    count_names,
    latin_share,
    read_stories,
    story_metrics,
)

LISTS = NameLists.build(
    english=["توم", "ليلي", "سام", "ماري آن", "فريد", "لي"],
    arabic=["سلمى", "يوسف", "فريد", "جمال الدين", "جمال", "ليلى", "وسام"],
    source={},
)


# --- one story, counted by hand ------------------------------------------------------------------


def test_names_whole_words_prefixes_multiword_and_ambiguity():
    text = (
        "ذهب توم وليلي إلى السوق. قال يُوسُف لتوم: «مرحبا». فريد هنا. "
        "جاءت ماري آن مع جمال الدين وجمال. الليلي ليس اسما، وماري، آن ليست اسما. قال لي سام وسام. "
        "فسلمى وليلى أختان، والتوم كلمة."
    )
    c = count_names(text, LISTS)
    # English: توم, وليلي (و stripped), ماري آن (two words), سام. لتوم: ل is never stripped.
    assert dict(c.matches) == {
        ("english", "توم"): 1, ("english", "ليلي"): 1, ("english", "ماري آن"): 1,
        ("english", "سام"): 1,
        # Arabic: يُوسُف (diacritics dropped), جمال الدين (longest first), وجمال, فسلمى, وليلى
        ("arabic", "يوسف"): 1, ("arabic", "جمال الدين"): 1, ("arabic", "جمال"): 1,
        ("arabic", "سلمى"): 1, ("arabic", "ليلى"): 1,
        ("ambiguous", "فريد"): 1,  # in both lists: no evidence either way
        ("ambiguous", "وسام"): 1,  # Wisam (Arabic list), or و + Sam (English list)
        ("function_word", "لي"): 1,  # "to me", though the English list holds it
    }  # fmt: skip
    # الليلي and والتوم keep their article (ال is never stripped); "ماري، آن" has a comma inside
    assert c.of("english") == 4 and c.of("arabic") == 5 and c.of("ambiguous") == 2
    m = story_metrics(text, LISTS)
    assert m["english_name_rate"] == pytest.approx(4 / 9)
    # ى and ي stay apart: ليلي (Lily) is English, ليلى (Layla) Arabic
    assert count_names("ليلى", LISTS).of("english") == 0


def test_dialogue_styles():
    text = 'قال توم، "مرحبا". "كيف حالك؟" سألت ليلي. قالت سلمى: «أهلا». قال يوسف: "شكرا".'
    # English: the quote after "،" and the quote that opens a sentence; Arabic: the guillemet and
    # the quote after a colon. Closing quotes are not turns.
    assert count_dialogue(text) == (2, 2)
    assert count_dialogue("قالت: “نعم” ثم قال “لا”") == (1, 1)  # curly quotes open and close
    assert count_dialogue('قال "لم أنته') == (1, 0)  # a cut-off sample still opened a turn
    assert count_dialogue("لا حوار هنا.") == (0, 0)
    assert story_metrics(text, LISTS)["english_dialogue_share"] == 0.5


def test_text_metrics():
    m = story_metrics("a b a b a", LISTS)
    assert m["distinct_1"] == pytest.approx(2 / 5)  # a, b of 5 words
    assert m["distinct_2"] == pytest.approx(2 / 4)  # ab, ba of 4 bigrams
    assert m["distinct_3"] == pytest.approx(2 / 3)  # aba, bab of 3 trigrams
    assert m["repetition"] == 0.0  # abab, baba: no 4-gram repeats
    assert m["length_words"] == 5 and m["length_chars"] == 9
    # 4-grams abca bcab cabc abca bcab cabc: the last three repeat the first three
    assert story_metrics("a b c a b c a b c", LISTS)["repetition"] == pytest.approx(0.5)
    assert story_metrics("a b c", LISTS)["repetition"] is None  # no 4-gram at all
    assert latin_share("abc دجه") == pytest.approx(0.5)  # 3 Latin letters of 6
    assert latin_share("Tom قال") == pytest.approx(3 / 6)
    assert latin_share("١٢٣ ...") is None  # no letters


def test_pooling_is_micro_over_mentions():
    stories = ["توم", "سلمى يوسف جمال", "لا أسماء هنا"]
    r = artifact_metrics(stories, LISTS, resamples=200)
    rate = r["metrics"]["english_name_rate"]
    assert rate["value"] == pytest.approx(1 / 4)  # pooled mentions, not the mean of 1.0 and 0.0
    assert rate["n"] == 2  # the story without names is no unit of this metric
    assert r["counts"]["english_mentions"] == 1 and r["counts"]["arabic_mentions"] == 3
    assert r["metrics"]["english_dialogue_share"] == {"value": None, "ci95": None, "n": 0}
    assert r["metrics"]["length_words"]["value"] == pytest.approx((1 + 3 + 3) / 3)
    assert r["top_matches"]["arabic"][0][1] == 1 and len(r["per_story"]) == 3


# --- the demo corpus' two styles ------------------------------------------------------------------


def test_demo_styles_give_the_extremes_with_the_demo_lists():
    translated = artifact_metrics(generate("translated", 100, 0), resamples=100)
    native = artifact_metrics(generate("native", 100, 0), resamples=100)
    for r, want in ((translated, 1.0), (native, 0.0)):
        for key in ("english_name_rate", "english_dialogue_share"):
            assert r["metrics"][key]["value"] == want and r["metrics"][key]["ci95"] == [want, want]
        assert r["counts"]["ambiguous_mentions"] == 0
        assert "demo corpus" in r["name_lists"]["english"]["source"]
    assert translated["counts"]["english_mentions"] == native["counts"]["arabic_mentions"] > 1000


# --- the bootstrap ------------------------------------------------------------------------------


def test_bootstrap_contains_the_value_narrows_and_is_seeded():
    pairs = zip(generate("translated", 200, 1), generate("native", 200, 1), strict=True)
    mixed = [s for pair in pairs for s in pair]
    small = artifact_metrics(mixed[:40], resamples=500)["metrics"]
    large = artifact_metrics(mixed, resamples=500)["metrics"]
    for m in (small, large):
        for key in ("english_name_rate", "length_words", "distinct_2"):
            lo, hi = m[key]["ci95"]
            assert lo <= m[key]["value"] <= hi
    width = {k: m["english_name_rate"]["ci95"][1] - m["english_name_rate"]["ci95"][0]
             for k, m in (("small", small), ("large", large))}  # fmt: skip
    assert 0 < width["large"] < width["small"] / 2  # 10x the stories: ~1/sqrt(10) the width
    v = [0.0, 1.0, 0.5, 0.25]
    assert bootstrap(v, seed=3) == bootstrap(v, seed=3) != bootstrap(v, seed=4)
    assert bootstrap([2.0, 2.0, 2.0]) == {"value": 2.0, "ci95": [2.0, 2.0], "n": 3}


# --- real stories and the shared name lists -----------------------------------------------------


def _shared_lists(shared_data) -> NameLists:
    names = shared_data / "names"
    # The Arabic side is Faker's surface-spelt names; arabic_given_names_wikidata.tsv holds folded
    # lookup keys and non-names (صغير, البحر), which would push the rate towards 0 for no reason.
    return NameLists.from_specs(
        [f"english={names}/english_first_names_arabic_script.tsv#arabic",
         f"arabic={names}/arabic_first_names.txt"],
        english_top=1000,
    )  # fmt: skip


def test_native_stories_have_almost_no_english_names(shared_data):
    """AraStories (GPT-4 native MSA stories): threshold 0.05, chosen before measuring."""
    stories = read_stories(
        shared_data / "arastories/Formatted-MSA-prompts-stories-for-fine-tuning.csv", "Story"
    )
    r = artifact_metrics(stories, _shared_lists(shared_data), resamples=200)
    rate, c = r["metrics"]["english_name_rate"], r["counts"]
    assert len(stories) == 996 and c["english_mentions"] + c["arabic_mentions"] > 5000
    assert rate["value"] <= 0.05, r["top_matches"]  # measured 0.035 [0.028, 0.044]
    assert ["يوسف", 2042] in r["top_matches"]["arabic"]


def test_english_names_from_the_shared_list_are_found(shared_data):
    lists = _shared_lists(shared_data)
    assert {("جيمس",), ("جون",), ("روبرت",), ("مايكل",), ("ديفيد",)} <= lists.english
    stories = [
        'كان جيمس وجون يلعبان في الحديقة. قال روبرت، "هيا نلعب بالكرة!" ضحك مايكل وديفيد.',
        'ذهب جون إلى البحر مع مايكل. "انظر!" صاح جيمس.',
    ]
    r = artifact_metrics(stories, lists, resamples=100)
    assert r["metrics"]["english_name_rate"]["value"] >= 0.95, r["top_matches"]
    assert r["counts"]["english_mentions"] == 8
    assert r["metrics"]["english_dialogue_share"]["value"] == 1.0


def test_name_list_specs():
    with pytest.raises(UserError, match="expected NAME=FILE"):
        NameLists.from_specs(["english"])
    with pytest.raises(UserError, match="must be english or arabic"):
        NameLists.from_specs(["persian=x.txt"])


def test_name_list_specs_need_both_sides(tmp_path):
    f = tmp_path / "en.txt"
    f.write_text("توم\nماري آن\n")
    with pytest.raises(UserError, match="no arabic list"):
        NameLists.from_specs([f"english={f}"])
    lists = NameLists.from_specs([f"english={f}", f"arabic={f}"], english_top=1)
    assert lists.english == {("توم",)} and lists.arabic == {("توم",), ("ماري", "آن")}


# --- the command --------------------------------------------------------------------------------


def test_cli_on_stories(tmp_path, capsys):
    src = tmp_path / "s.jsonl"
    src.write_text("".join(json.dumps({"story": s}, ensure_ascii=False) + "\n"
                           for s in generate("translated", 5, 0)))  # fmt: skip
    out, per = tmp_path / "r/a.json", tmp_path / "per.jsonl"
    argv = ["eval", "artifacts", "--stories", str(src), "--field", "story", "--out", str(out),
            "--per-story", str(per), "--resamples", "50"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["stories"] == 5 and report["source"] == {"stories": str(src)}
    assert report["metrics"]["english_name_rate"]["value"] == 1.0
    assert len(per.read_text().splitlines()) == 5


@pytest.fixture(scope="module")
def tiny_model(demo_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("artifacts_model") / "m"
    assert main(["init", "--preset", "ts-1m", "--vocab-size", "400", "--tokenizer",
                 str(demo_data["tok"]), "--out", str(d)]) == 0  # fmt: skip
    return d


def test_cli_samples_a_checkpoint(tiny_model, demo_data, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("كان يا ما كان\n\nفي يوم مشمس\n")
    out, samples = tmp_path / "a.json", tmp_path / "samples.jsonl"
    argv = ["eval", "artifacts", "--checkpoint", str(tiny_model), "--n", "3", "--prompts",
            str(prompts), "--max-new-tokens", "8", "--batch-size", "2", "--out", str(out),
            "--samples-out", str(samples), "--resamples", "20"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["stories"] == 3 and report["source"]["checkpoint"] == str(tiny_model)
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["كان يا ما كان", "في يوم مشمس", "كان يا ما كان"]
    assert report["metrics"]["length_chars"]["value"] == pytest.approx(
        sum(len(r["text"]) for r in rows) / 3
    )
    capsys.readouterr()
    # no prompts: stories start after EOS alone; the tokenizer is the one the model records
    assert main(["eval", "artifacts", "--checkpoint", str(tiny_model), "--n", "2",
                 "--max-new-tokens", "4", "--resamples", "10"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["stories"] == 2 and report["source"]["tokenizer"] == str(demo_data["tok"])


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--stories", "{tmp}/missing.jsonl"], "input file not found"),
        (["--stories", "{src}", "--names", "english"], "expected NAME=FILE"),
        (["--stories", "{src}", "--names", "english={names}#arab", "--names", "arabic={names}"],
         "no column 'arab'"),
        (["--stories", "{src}", "--names", "english={names}#english"], "no arabic list"),
        (["--stories", "{src}", "--english-top", "10"], "--english-top needs --names"),
        (["--stories", "{src}", "--field", "story"], "missing field 'story'"),
        (["--stories", "{src}", "--n", "3"], "use --checkpoint"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(tmp_path, capsys, flags, needle):
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps({"text": "قال توم"}) + "\n")
    names = tmp_path / "n.tsv"
    names.write_text("english\tarabic\nTom\tتوم\n")
    argv = [f.format(tmp=tmp_path, src=src, names=names) for f in flags]
    assert main(["eval", "artifacts", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and err.startswith("jaxlm eval: error:")
