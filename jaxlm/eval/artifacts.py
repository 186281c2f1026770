"""Translation artifacts and text quality in stories, with bootstrap intervals over stories.

The paper's measurable claim: a model trained on machine-translated TinyStories writes the
translation's artifacts (transliterated English names such as ليلي، تيم، توم; English dialogue
order `قالت ليلي، "..."`), and continual pre-training on native stories removes much of it. Here
each story is measured on its own, then the stories are pooled, with a percentile bootstrap over
stories (the stories are the independent units; mentions within a story are not).

Names (`english_name_rate`): the share of English-list mentions among the person-name mentions
matched from two lists (English names in Arabic script, Arabic names). Choices, and why:

* Whole words only, compared after NFKC, with Arabic diacritics and tatweel removed and case
  folded (the lists get the same treatment); never a subword token. Letters are not folded
  further (no ى/ي, ة/ه or hamza-alef folding): transliteration shows in exactly those letters
  (ليلي, Lily, against ليلى, Layla), and folding merges ordinary words with names (أن "that" with
  ان). So lists must be in surface spelling; `arabic_given_names_wikidata.tsv`'s folded lookup
  keys are not (and hold non-names such as في), `arabic_first_names.txt` is.
* Multi-word names (`جمال الدين`) match the longest listed sequence of words separated by spaces
  (or a hyphen or apostrophe), before any shorter name inside it.
* One attached conjunction و or ف may be stripped (`وتوم` -> توم, as in `ليلي وتوم`), unless the
  word as written is a function word; when both readings are names from different lists the
  mention is ambiguous (وسام: Wisam, or "and Sam"). ب، ل، ك are not stripped, nor ال (names take no
  article; stripping it turns الليل into ليل): a missed `لتوم` only lowers the counts on both lists
  alike, while a false match (لبن -> بن) biases the rate.
* A mention listed as English and as Arabic is ambiguous (يوسف, عمر and سامي are in the English
  list too): counted in `counts.ambiguous_mentions`, not as evidence either way.
* Arabic function words, kinship terms and interjections (`FUNCTION_WORDS`: particles,
  prepositions, pronouns, كان and its forms, أمي "my mother", هيا "come on") are never names,
  whatever a list holds: big transliteration lists contain them (لا, لو, كان, and Amy spelt
  أمي). Their matches are counted apart (`counts.function_word_mentions`).
* Lists are only as good as their entries: names that are also ordinary words (بيت "house" in
  the English list, صباح "morning" in the Arabic one) match anyway. `top_matches` shows the most
  frequent matches of each kind; read it before trusting a rate.
* Aggregation is micro (pooled mentions of all stories), so a story weighs by its mentions; the
  interval resamples the stories that have at least one counted mention (`n`).

Dialogue (`english_dialogue_share`): each opening quote is one turn. A Latin double quote (" or “)
opens an English-style turn (`قال توم، "..."`, `"..." قال توم.`) unless a colon precedes it; an
opening guillemet «, or any quote after a colon (`قالت سلمى: «...»`), is Arabic style. Straight
quotes alternate open/close within a story. Dialogue without quotes is not detected. Micro, as
for names.

Text (mean over stories, each story once): `distinct_n` (distinct word n-grams / all, within a
story), `repetition` (the share of a story's word 4-grams that repeat an earlier one in it: 1 -
distinct_4), `latin_share` (Latin letters / all letters), `length_words`, `length_chars`. A story
where a value is undefined (no letters; fewer than n words) is left out of that metric's `n`.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from jaxlm.errors import UserError

_MARKS = re.compile(r"[\u0610-\u061A\u064B-\u065F\u0670\u06D6-\u06ED\u0640]")  # harakat, tatweel
_WORD = re.compile(r"[^\W_]+")  # letters and digits of any script
_JOIN = re.compile(r"[\s\-'’]+")  # what may separate the words of one multi-word name
_CONJUNCTIONS = "وف"
_LATIN = re.compile(r"[A-Za-z\u00C0-\u024F]")

# Closed-class words, kinship terms with "my" and interjections: never person names. With and
# without hamza, as stories write them. The shared English-in-Arabic-script list holds several.
FUNCTION_WORDS = frozenset(
    """
    في من إلى الى على عن مع حتى منذ لدى عند بين نحو خلال دون فوق تحت أمام امام وراء خلف قبل بعد
    حول ضد عبر سوى غير مثل كل بعض أي اي
    لا لم لن ما ماذا متى أين اين كيف هل قد لقد بل لكن لعل ليت إن ان أن كأن لأن ثم أو او أم ام إذا
    اذا إذ إذن لو لولا كي لكي حيث بينما عندما كلما ها يا أيها أيتها نعم كلا بلى إلا الا سوف
    أنا انا أنت انت أنتما أنتم أنتن هو هي هما هم هن نحن
    لي لك له لها لنا لكم لهم لهما بي بك به بها بنا بكم بهم مني منك منه منها منا منكم منهم عني عنك
    عنه عنها عنا عنهم فيه فيها فيك فينا فيهم عليه عليها عليك علينا عليهم إلي إليك إليه إليها إلينا
    إليهم اليك اليه اليها معي معك معه معها معنا معهم عندي عندك عنده عندها عندنا عندهم
    هذا هذه هذان هاتان ذلك تلك هؤلاء أولئك هنا هناك هنالك
    الذي التي الذين اللذان اللتان اللواتي اللاتي
    كان كانت كانا كانتا كانوا كن يكون تكون يكونون يكن تكن أكون نكون ليس ليست ليسوا صار صارت أصبح
    أصبحت ظل ظلت بات باتت مازال زال
    أب أم أخ أخت جد جدة عم عمة خال خالة ابن ابنة أبي أمي امي أخي أختي جدي جدتي عمي عمتي خالي خالتي
    ابني ابنتي
    هيا آه أوه اوه واو أف
    """.split()
)


def normalize(text: str) -> str:
    """NFKC, without Arabic diacritics and tatweel, case-folded: the form words are compared in."""
    return _MARKS.sub("", unicodedata.normalize("NFKC", text)).casefold()


def words(text: str) -> list[str]:
    """A story's words (normalised runs of letters and digits), in order."""
    return _WORD.findall(normalize(text))


# --- name lists ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NameLists:
    """English names (in Arabic script) and Arabic names, each entry a tuple of normalised words."""

    english: frozenset[tuple[str, ...]]
    arabic: frozenset[tuple[str, ...]]
    source: dict  # where the lists came from, for the report
    longest: int = dataclasses.field(init=False)  # words in the longest entry

    def __post_init__(self) -> None:
        longest = max((len(e) for e in self.english | self.arabic), default=1)
        object.__setattr__(self, "longest", longest)

    @classmethod
    def build(cls, english: Iterable[str], arabic: Iterable[str], source: dict) -> NameLists:
        def entries(names: Iterable[str]) -> frozenset[tuple[str, ...]]:
            return frozenset(t for t in (tuple(words(n)) for n in names) if t)

        return cls(entries(english), entries(arabic), source)

    @classmethod
    def demo(cls) -> NameLists:
        """The demo corpus' own lists (jaxlm.data.demo_corpus.ENGLISH_NAMES_AR, ARABIC_NAMES)."""
        from jaxlm.eval.wordlists import demo_word_lists

        lists = demo_word_lists()
        en, ar = lists["english_names"], lists["arabic_names"]
        where = "jaxlm.data.demo_corpus.{} (the demo corpus' own list: no other lists given)"
        return cls.build(en, ar, {
            "english": {"source": where.format("ENGLISH_NAMES_AR"), "entries": len(en)},
            "arabic": {"source": where.format("ARABIC_NAMES"), "entries": len(ar)},
        })  # fmt: skip

    @classmethod
    def from_specs(cls, specs: Sequence[str], english_top: int | None = None) -> NameLists:
        """`english=FILE[#COLUMN]` and `arabic=FILE[#COLUMN]` (repeat a side for a union).

        `english_top` keeps the first entries of each English file: the shared English list is in
        order of US popularity, and its rare names are where it collides with Arabic words and
        names (أفضل Afzal, أراد Arad, لمياء Lamia); TinyStories' names are common ones.
        """
        from jaxlm.eval.wordlists import load_word_list, parse_names_spec

        if english_top is not None and english_top < 1:
            raise UserError(f"--english-top {english_top}: must be >= 1")
        names: dict[str, list[str]] = {"english": [], "arabic": []}
        source: dict = {side: {"source": [], "entries": 0} for side in names}
        for spec in specs:
            side, path, column = parse_names_spec(spec)
            if side not in names:
                raise UserError(f"--names {spec!r}: the list name must be english or arabic")
            got = load_word_list(path, column)[: english_top if side == "english" else None]
            names[side] += got
            source[side]["source"].append(f"{path}#{column}" if column else str(path))
        missing = [side for side, got in names.items() if not got]
        if missing:
            raise UserError(
                f"--names: no {' or '.join(missing)} list; give english=FILE[#COLUMN] and "
                "arabic=FILE[#COLUMN] (or neither, for the demo's lists)"
            )
        lists = cls.build(names["english"], names["arabic"], source)
        source["english"]["entries"] = len(lists.english)  # distinct entries after normalising
        source["arabic"]["entries"] = len(lists.arabic)
        if english_top is not None:
            source["english"]["first_entries_of_each_file"] = english_top
        return lists


# --- one story ----------------------------------------------------------------------------------


@dataclasses.dataclass
class NameCounts:
    """One story's name matches: (kind, name) -> mentions, kind english, arabic, ambiguous (in
    both lists) or function_word (a listed function word, never counted as a name)."""

    matches: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)

    def of(self, kind: str) -> int:
        return sum(c for (k, _), c in self.matches.items() if k == kind)


def _tokens(text: str) -> list[tuple[str, bool]]:
    """(word, joined): joined when only a space, hyphen or apostrophe separates it from the last."""
    norm, out, end = normalize(text), [], None
    for m in _WORD.finditer(norm):
        joined = end is not None and _JOIN.fullmatch(norm[end : m.start()]) is not None
        out.append((m.group(), joined))
        end = m.end()
    return out


def _readings(word: str) -> list[str]:
    """The word as written, then without one attached conjunction (و, ف)."""
    if word[0] in _CONJUNCTIONS and len(word) >= 3:
        return [word, word[1:]]
    return [word]


def _match_at(toks: list[tuple[str, bool]], i: int, lists: NameLists) -> tuple[str, str, int]:
    """(kind, name, words) of the longest listed name starting at word i; kind "" for none.

    A word that is a function word as written is one (kind "function_word" when listed). A word
    whose two readings (as written, without و/ف) are names from different lists is ambiguous:
    وسام is the Arabic name Wisam, and "and Sam".
    """
    for k in range(min(lists.longest, len(toks) - i), 0, -1):
        if k > 1 and not all(toks[j][1] for j in range(i + 1, i + k)):
            continue
        rest = tuple(w for w, _ in toks[i + 1 : i + k])
        cands = [(first, *rest) for first in _readings(toks[i][0])]
        if k == 1 and cands[0][0] in FUNCTION_WORDS:
            listed = cands[0] in lists.english or cands[0] in lists.arabic
            return ("function_word" if listed else ""), cands[0][0], 1
        hits = [c for c in cands if c in lists.english or c in lists.arabic]
        if k == 1:
            hits = [c for c in hits if c[0] not in FUNCTION_WORDS]
        if hits:
            en = any(c in lists.english for c in hits)
            ar = any(c in lists.arabic for c in hits)
            return (
                ("ambiguous" if en and ar else "english" if en else "arabic"),
                " ".join(hits[0]),
                k,
            )
    return "", "", 1


def count_names(text: str, lists: NameLists) -> NameCounts:
    """Name mentions in one story, scanning words left to right, longest name first."""
    c, toks, i = NameCounts(), _tokens(text), 0
    while i < len(toks):
        kind, name, k = _match_at(toks, i, lists)
        i += k
        if kind:
            c.matches[(kind, name)] += 1
    return c


_OPEN_CLOSE = {"“": True, "”": False}


def count_dialogue(text: str) -> tuple[int, int]:
    """(English-style turns, Arabic-style turns): one per opening quote, styled as documented."""
    english = arabic = 0
    inside = False  # within a Latin-quoted span
    for i, ch in enumerate(text):
        if ch == "«":
            arabic += 1
        elif ch in '"“”':
            opening = _OPEN_CLOSE.get(ch, not inside)
            inside = opening
            if opening:
                before = text[:i].rstrip()
                if before.endswith((":", "：")):
                    arabic += 1
                else:
                    english += 1
    return english, arabic


def _distinct(ws: list[str], n: int) -> float | None:
    grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def latin_share(text: str) -> float | None:
    """Latin letters / all letters; None without letters."""
    letters = [ch for ch in text if ch.isalpha()]
    return sum(bool(_LATIN.match(ch)) for ch in letters) / len(letters) if letters else None


def story_metrics(text: str, lists: NameLists) -> dict:
    """Everything measured on one story: counts and the story's own values."""
    return _story(text, lists)[0]


def _story(text: str, lists: NameLists) -> tuple[dict, Counter[tuple[str, str]]]:
    names, (en_turns, ar_turns), ws = count_names(text, lists), count_dialogue(text), words(text)
    en, ar, d4 = names.of("english"), names.of("arabic"), _distinct(ws, 4)
    values = {
        "english_mentions": en, "arabic_mentions": ar,
        "ambiguous_mentions": names.of("ambiguous"),
        "function_word_mentions": names.of("function_word"),
        "english_name_rate": _ratio(en, en + ar),
        "english_turns": en_turns, "arabic_turns": ar_turns,
        "english_dialogue_share": _ratio(en_turns, en_turns + ar_turns),
        "distinct_1": _distinct(ws, 1), "distinct_2": _distinct(ws, 2),
        "distinct_3": _distinct(ws, 3), "repetition": None if d4 is None else 1.0 - d4,
        "latin_share": latin_share(text), "length_words": len(ws), "length_chars": len(text),
    }  # fmt: skip
    return values, names.matches


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


# --- over stories -------------------------------------------------------------------------------


def bootstrap(
    values: Sequence[float], weights: Sequence[float] | None = None, *, resamples: int = 1000,
    seed: int = 0,
) -> dict:  # fmt: skip
    """`{"value", "ci95": [lo, hi], "n"}`: the mean of `values` (weighted by `weights`: a pooled
    ratio sum(w * v) / sum(w)) and its 95% percentile bootstrap interval, resampling the n units
    with replacement `resamples` times from a generator seeded with `seed`."""
    v = np.asarray(values, np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, np.float64)
    n = len(v)
    if n == 0:
        return {"value": None, "ci95": None, "n": 0}
    value = float((w * v).sum() / w.sum())
    rng, stats = np.random.default_rng(seed), []
    for start in range(0, resamples, 100):  # [R, n] index blocks keep memory small
        idx = rng.integers(0, n, size=(min(100, resamples - start), n))
        stats.append((w[idx] * v[idx]).sum(1) / w[idx].sum(1))
    lo, hi = np.percentile(np.concatenate(stats), [2.5, 97.5])
    # the percentile ends can miss a constant value by float rounding; keep it inside
    return {"value": value, "ci95": [float(min(lo, value)), float(max(hi, value))], "n": n}


TEXT_METRICS = ("distinct_1", "distinct_2", "distinct_3", "repetition", "latin_share",
                "length_words", "length_chars")  # fmt: skip
COUNTS = ("english_mentions", "arabic_mentions", "ambiguous_mentions",
          "function_word_mentions", "english_turns", "arabic_turns")  # fmt: skip
_POOLED = {"english_name_rate": ("english_mentions", "arabic_mentions"),
           "english_dialogue_share": ("english_turns", "arabic_turns")}  # fmt: skip


def artifact_metrics(
    stories: Sequence[str], lists: NameLists | None = None, *, resamples: int = 1000,
    seed: int = 0, top: int = 10,
) -> dict:  # fmt: skip
    """The report: metrics with intervals, pooled counts, the most frequent matches per kind,
    and which name lists were used (the demo's when `lists` is None). `per_story` holds each
    story's own values."""
    lists = lists or NameLists.demo()
    per: list[dict] = []
    matches: Counter[tuple[str, str]] = Counter()
    for s in stories:
        values, found = _story(s, lists)
        per.append(values)
        matches.update(found)
    metrics = {}
    for name, (a, b) in _POOLED.items():
        rows = [p for p in per if p[a] + p[b]]
        metrics[name] = bootstrap([p[name] for p in rows], [p[a] + p[b] for p in rows],
                                  resamples=resamples, seed=seed)  # fmt: skip
    for name in TEXT_METRICS:
        vals = [p[name] for p in per if p[name] is not None]
        metrics[name] = bootstrap(vals, resamples=resamples, seed=seed)
    counts = {k: sum(p[k] for p in per) for k in COUNTS}
    kinds = ("english", "arabic", "ambiguous", "function_word")
    return {
        "stories": len(stories),
        "metrics": metrics,
        "counts": counts,
        "top_matches": {
            k: [[n, c] for (kk, n), c in matches.most_common() if kk == k][:top] for k in kinds
        },  # fmt: skip
        "name_lists": lists.source,
        "bootstrap": {
            "resamples": resamples,
            "seed": seed,
            "interval": "percentile, 95%",
            "unit": "story",
        },  # fmt: skip
        "per_story": per,
    }


def read_stories(path: str | Path, field: str = "text") -> list[str]:
    """Stories from a file any `jaxlm.data.readers` reader takes (JSONL/CSV `field`, .txt, ...)."""
    from jaxlm.data.readers import ReadOptions, read

    return list(read(str(path), options=ReadOptions(field=field)))
