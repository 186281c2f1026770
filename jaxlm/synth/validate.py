"""Checks on one generated story, and exact plus near-duplicate detection.

Required words allow for Arabic morphology by affix stripping (not a full analyser): after
normalising both sides (no diacritics or tatweel; أ/إ/آ -> ا; ى -> ي; final ة -> ه), a token of the
story matches a required word when it is

    [و|ف] [ب|ل|ك] [ال] STEM [suffix]      (nouns and adjectives; also لل = ل + ال)
    [و|ف] [س] [ي|ت|ن|ا] STEM [suffix]     (verbs: the imperfect prefixes)

where STEM is the word without its own ال, a final ه (from ة) may appear as ت before a suffix, a
final ي (weak verbs) may drop, and the suffix is one of `_SUFFIXES` (pronouns, plural, dual,
feminine and verb endings). Broken plurals and internal changes ("قطط" for "قطة") are not matched:
the prompt asks for the word as given, so a story using only a broken plural is rejected.

Near duplicates: MinHash (128 hashes: 32 LSH bands of 4 rows) over character 5-grams of the
normalised text; a candidate whose estimated Jaccard similarity is >= `threshold` is a duplicate.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

_DIACRITICS = re.compile(r"[\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed\u0640]")
_SUFFIXES = (
    "", "ه", "ها", "هم", "هن", "هما", "ك", "كم", "كما", "ي", "ني", "نا", "ات", "ون", "ين", "ان",
    "ا", "وا", "ت", "تا", "تم", "ن", "يه", "وه", "اه", "تها", "ته", "تان", "تين",
)  # fmt: skip
_NOUN_PREFIX = re.compile(r"^(?:[وف])?(?:[بلك])?(?:ال)?")
_VERB_PREFIX = re.compile(r"^(?:[وف])?(?:س)?(?:[يتنا])?")
_ARABIC = re.compile(r"[\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufeff]")


def normalize(text: str) -> str:
    """Arabic orthographic normalisation for matching (not for output)."""
    text = _DIACRITICS.sub("", text)
    text = re.sub("[أإآ]", "ا", text).replace("ى", "ي")
    return re.sub(r"ة\b", "ه", text)


def _stems(word: str) -> set[str]:
    w = normalize(word)
    w = w[2:] if w.startswith("ال") and len(w) > 4 else w
    stems = {w}
    if w.endswith("ه"):
        stems.add(w[:-1] + "ت")
    if w.endswith("ي") and len(w) > 2:
        stems.add(w[:-1])
    return stems


def _token_matches(token: str, stems: set[str]) -> bool:
    for prefix in (_NOUN_PREFIX, _VERB_PREFIX):
        for cut in _prefix_cuts(token, prefix):
            rest = token[cut:]
            if any(rest == s + suf for s in stems for suf in _SUFFIXES):
                return True
    return False


def _prefix_cuts(token: str, prefix: re.Pattern) -> range:
    """Every prefix length up to the longest the pattern allows (prefixes are optional)."""
    m = prefix.match(token)
    return range(0, (m.end() if m else 0) + 1)


def has_word(text: str, word: str) -> bool:
    """Whether `text` uses `word` in some inflected form (see the module docstring)."""
    stems = _stems(word)
    if word.startswith("لل"):
        stems.add(normalize(word))
    tokens = set(re.findall(r"[\w]+", normalize(text)))
    tokens.update(t[1:] for t in list(tokens) if t.startswith("لل"))  # لل = ل + ال
    return any(_token_matches(t, stems) for t in tokens)


def arabic_share(text: str) -> float:
    """Share of letters (not digits or punctuation) in the Arabic script."""
    letters = re.findall(r"[^\W\d_]", text)
    return len(_ARABIC.findall("".join(letters))) / len(letters) if letters else 0.0


@dataclass(frozen=True)
class StoryChecks:
    """Acceptance thresholds for one story."""

    min_words: int = 60
    max_words: int = 800
    min_arabic: float = 0.95  # share of letters in the Arabic script


def clean_story(text: str) -> str:
    """Strip markdown headings and bold marks a chat model may add around the story."""
    lines = [ln for ln in text.strip().splitlines() if not ln.lstrip().startswith("#")]
    return re.sub(r"\*\*|__", "", "\n".join(lines)).strip()


def check_story(text: str, words: dict, checks: StoryChecks) -> str | None:
    """The rejection reason, or None: `arabic_ratio`, `too_short`, `too_long`, `missing_word`."""
    if arabic_share(text) < checks.min_arabic:
        return "arabic_ratio"
    n = len(text.split())
    if n < checks.min_words:
        return "too_short"
    if n > checks.max_words:
        return "too_long"
    if not all(has_word(text, w) for w in words.values()):
        return "missing_word"
    return None


_P = np.uint64(4294967311)  # a prime above 2**32


class Deduper:
    """Exact (normalised text hash) and near-duplicate (MinHash LSH) detection."""

    def __init__(self, threshold: float = 0.7, n_hash: int = 128, bands: int = 32, k: int = 5):
        rng = np.random.default_rng(12345)
        self.a = rng.integers(1, 2**31, n_hash, dtype=np.uint64)
        self.b = rng.integers(0, 2**31, n_hash, dtype=np.uint64)
        self.threshold, self.bands, self.k = threshold, bands, k
        self.rows = n_hash // bands
        self.exact: set[str] = set()
        self.buckets: dict[tuple[int, bytes], list[int]] = {}
        self.signatures: list[np.ndarray] = []

    def _canon(self, text: str) -> str:
        return re.sub(r"\s+", " ", normalize(text)).strip()

    def signature(self, text: str) -> np.ndarray:
        canon = self._canon(text)
        grams = {canon[i : i + self.k] for i in range(max(1, len(canon) - self.k + 1))}
        h = np.array(
            [
                int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little")
                for g in grams
            ],
            dtype=np.uint64,
        )
        return ((np.outer(self.a, h) + self.b[:, None]) % _P).min(axis=1)  # [n_hash]

    def check(self, text: str) -> str | None:
        """'exact_duplicate', 'near_duplicate' or None (does not add the text)."""
        if hashlib.sha1(self._canon(text).encode()).hexdigest() in self.exact:
            return "exact_duplicate"
        sig = self.signature(text)
        seen = set()
        for band, key in self._band_keys(sig):
            for j in self.buckets.get((band, key), ()):
                if j not in seen and np.mean(self.signatures[j] == sig) >= self.threshold:
                    return "near_duplicate"
                seen.add(j)
        return None

    def add(self, text: str) -> None:
        self.exact.add(hashlib.sha1(self._canon(text).encode()).hexdigest())
        sig = self.signature(text)
        for bk in self._band_keys(sig):
            self.buckets.setdefault(bk, []).append(len(self.signatures))
        self.signatures.append(sig)

    def _band_keys(self, sig: np.ndarray):
        for band in range(self.bands):
            yield band, sig[band * self.rows : (band + 1) * self.rows].tobytes()
