"""The built-in demo corpus: deterministic, and the two styles differ only in names and dialogue."""

import re
from collections import Counter

from jaxlm.data.demo_corpus import ARABIC_NAMES, ENGLISH_NAMES_AR, generate

NAMES = {n for n, _ in ARABIC_NAMES + ENGLISH_NAMES_AR}


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
