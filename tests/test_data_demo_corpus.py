"""The built-in demo corpus: deterministic, and the two styles differ only in names and dialogue;
`english_name_share` changes who gets an English name and nothing else."""

import hashlib
import json
import math
import re
from collections import Counter

import pytest

from jaxlm.cli import main
from jaxlm.data.demo_corpus import ARABIC_NAMES, ENGLISH_NAMES_AR, generate, story

NAMES = {n for n, _ in ARABIC_NAMES + ENGLISH_NAMES_AR}
ARABIC = {n for n, _ in ARABIC_NAMES}
ENGLISH = {n for n, _ in ENGLISH_NAMES_AR}


def _skeleton(story: str) -> Counter:
    """Words with names and dialogue punctuation removed (order ignored: dialogue moves)."""
    words = re.sub(r'[«»":،.!؟]', " ", story).split()
    out = []
    for w in words:
        if w in NAMES or (w[:1] in "ول" and w[1:] in NAMES):
            out.append("NAME")
        else:
            out.append(w)
    return Counter(out)


def test_deterministic_and_varied():
    a = generate("native", 200, seed=3)
    assert a == generate("native", 200, seed=3)
    assert a != generate("native", 200, seed=4)
    assert len(set(a)) == 200
    lengths = [len(s.split()) for s in a]
    assert 80 <= min(lengths) and max(lengths) <= 200


def test_styles_differ_in_names_and_dialogue_only():
    native, translated = generate("native", 100, 0), generate("translated", 100, 0)
    arabic = {n for n, _ in ARABIC_NAMES}
    english = {n for n, _ in ENGLISH_NAMES_AR}
    for n, t in zip(native, translated, strict=True):
        assert "«" in n and '"' not in n
        assert "«" not in t and '"' in t
        assert set(n.split()) & arabic and not set(re.findall(r"\w+", n)) & english
        assert set(t.split()) & english and not set(re.findall(r"\w+", t)) & arabic
        assert _skeleton(n) == _skeleton(t)
    assert any(
        re.search(r'"[^"]+" (قال|قالت|سأل|سألت|صاح|صاحت|همس|همست|أجاب|أجابت) ', t)
        for t in translated
    )
    assert any(re.search(r"(قال|قالت) \w+: «", n) for n in native)
    assert any(re.search(r'(قال|قالت) \w+، "', t) for t in translated)


WORD = r'[^\s«»":،.!؟]+'  # what _skeleton splits on: كريمًا (generous) is not the name كريم


def _name(word: str) -> str | None:
    """The name a word is (alone, or after the prefix و or ل), else None."""
    return word if word in NAMES else word[1:] if word[:1] in "ول" and word[1:] in NAMES else None


def _names(story: str) -> set[str]:
    return {n for w in re.findall(WORD, story) if (n := _name(w))}


def _masked(story: str) -> str:
    """The story, in order, with every name replaced: what must not depend on the names."""
    return re.sub(WORD, lambda m: "NAME" if _name(m.group()) else m.group(), story)


def test_share_one_is_the_default_and_the_text_before_the_option():
    """Share 1.0 is the default, and the text is byte for byte what the generator wrote before
    `english_name_share` existed (hashes taken from that version): a rerun of an existing demo
    makes the same corpus."""
    for seed in (0, 5):
        assert generate("translated", 300, seed, english_name_share=1.0) == generate(
            "translated", 300, seed
        )
    before = {"native": "051459af64997e3e", "translated": "0931120e91a568eb"}
    for style, digest in before.items():
        text = "\n".join(generate(style, 200, 0)).encode()
        assert hashlib.sha256(text).hexdigest()[:16] == digest


def test_english_name_share_is_each_characters_chance_and_changes_nothing_else():
    n, p = 2000, 0.7
    partial = generate("translated", n, 0, english_name_share=p)
    full, native = generate("translated", n, 0), generate("native", n, 0)
    english = arabic = mixed = 0
    for s, f, nat in zip(partial, full, native, strict=True):
        names = _names(s)
        assert len(names) == 2 and names <= _names(f) | _names(nat)  # two distinct characters
        english, arabic = english + len(names & ENGLISH), arabic + len(names & ARABIC)
        mixed += len(names & ENGLISH) == 1
        assert _masked(s) == _masked(f)  # plot, dialogue order and punctuation: share 1.0's
        assert _skeleton(s) == _skeleton(nat)  # and the same tale as the native story
    # each of 2n characters is English with probability p, independently: a binomial count
    assert english + arabic == 2 * n
    assert abs(english - 2 * n * p) <= 4 * math.sqrt(2 * n * p * (1 - p)), english / (2 * n)
    assert mixed > 0  # one English and one Arabic name in one story happens (and they differ)
    assert not ENGLISH & ARABIC  # why names from the two lists never coincide


def test_share_zero_gives_arabic_names_with_english_dialogue_order():
    zero, native = (
        generate("translated", 200, 3, english_name_share=0.0),
        generate("native", 200, 3),
    )
    for z, nat in zip(zero, native, strict=True):
        assert _names(z) == _names(nat) and _names(z) <= ARABIC  # the native story's names
        assert '"' in z and "«" not in z


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan")])
def test_a_share_outside_zero_one_is_refused(share):
    with pytest.raises(ValueError, match="english_name_share=.* must be in \\[0, 1\\]"):
        story("translated", 0, 0, english_name_share=share)


def test_native_refuses_a_share_below_one():
    with pytest.raises(ValueError, match="english_name_share=0.5 applies to the translated style"):
        generate("native", 3, 0, english_name_share=0.5)
    assert generate("native", 3, 0, english_name_share=1.0) == generate("native", 3, 0)


def test_cli_identity_gains_the_share_only_when_it_is_not_one(tmp_path, capsys):
    """A file written without the flag has the identity files had before the option existed,
    so it is found done on a rerun; a share below 1 is another setting."""
    out = tmp_path / "t.jsonl"
    base = ["data", "demo-corpus", "--style", "translated", "--n", "20", "--out", str(out)]
    assert main(base) == 0
    saved = json.loads(out.with_name("t.jsonl.identity.json").read_text())["identity"]
    assert saved == {"style": "translated", "n": 20, "seed": 0}
    for again in (base, [*base, "--english-name-share", "1.0"]):
        capsys.readouterr()
        assert main(again) == 0
        assert "already made with these settings" in capsys.readouterr().err
    assert main([*base, "--english-name-share", "0.5"]) == 2
    assert "english_name_share" in capsys.readouterr().err
    assert main([*base, "--english-name-share", "0.5", "--overwrite"]) == 0
    saved = json.loads(out.with_name("t.jsonl.identity.json").read_text())["identity"]
    assert saved["english_name_share"] == 0.5
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert texts == generate("translated", 20, 0, english_name_share=0.5)


@pytest.mark.parametrize(
    "args, says",
    [
        (["--style", "native", "--english-name-share", "0.5"], "--english-name-share applies to"),
        (["--style", "translated", "--english-name-share", "2"], "--english-name-share 2.0: must"),
    ],
)
def test_cli_refuses_a_share_it_cannot_use_in_one_line(tmp_path, capsys, args, says):
    out = tmp_path / "x.jsonl"
    assert main(["data", "demo-corpus", *args, "--n", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and not out.exists()
