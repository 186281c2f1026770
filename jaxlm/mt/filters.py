"""Checks on a translated story; the first failing one names the rejection reason.

| reason          | rule (defaults in `FilterConfig`)                                              |
|-----------------|--------------------------------------------------------------------------------|
| `empty`         | the story, or any non-empty source sentence, translated to nothing            |
| `repetition`    | a 1-20 character unit repeated >= 6 times in a row (absent from the source),   |
|                 | or fewer than 30% distinct word 3-grams in a text of >= 30 words               |
| `length_ratio`  | target/source characters (no spaces) outside [0.5, 2.2], or a source sentence  |
|                 | of >= 40 characters translated to under 20% of its length (truncated output)   |
| `untranslated`  | > 10% of the letters Latin for a non-Latin target, or a sentence (>= 12 chars) |
|                 | copied unchanged                                                               |
| `wrong_script`  | < 80% of the letters in the target script (known scripts only; see `_SCRIPTS`) |
"""

from __future__ import annotations

import re
from dataclasses import dataclass

REASONS = ("empty", "repetition", "length_ratio", "untranslated", "wrong_script")

_SCRIPTS = {
    "Arab": "\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufeff",
    "Latn": "A-Za-z\u00c0-\u024f",
    "Cyrl": "\u0400-\u04ff",
    "Hebr": "\u0590-\u05ff",
    "Grek": "\u0370-\u03ff",
    "Deva": "\u0900-\u097f",
}
# M2M100-style two-letter codes whose script is known.
_ISO_SCRIPT = {"ar": "Arab", "fa": "Arab", "ur": "Arab", "ru": "Cyrl", "uk": "Cyrl", "he": "Hebr"}
_ISO_SCRIPT |= {"el": "Grek", "hi": "Deva", "en": "Latn", "fr": "Latn", "de": "Latn", "es": "Latn"}
_REPEAT = re.compile(r"(.{1,20}?)\1{5,}", re.DOTALL)


@dataclass(frozen=True)
class FilterConfig:
    """Enabled checks and their thresholds."""

    enabled: tuple[str, ...] = REASONS  # subset of REASONS, checked in this order
    min_ratio: float = 0.5  # target/source non-space characters, whole story
    max_ratio: float = 2.2
    min_sentence_ratio: float = 0.2  # per source sentence of >= 40 characters
    max_latin: float = 0.1  # share of Latin letters tolerated in a non-Latin target
    min_script: float = 0.8  # share of letters in the target script

    def __post_init__(self):
        bad = set(self.enabled) - set(REASONS)
        if bad:
            raise ValueError(f"unknown filters {sorted(bad)}; choose from {', '.join(REASONS)}")


def script_of(lang: str) -> str | None:
    """'arb_Arab' -> 'Arab'; 'ar' -> 'Arab'; unknown -> None."""
    if "_" in lang:
        return lang.rsplit("_", 1)[1]
    return _ISO_SCRIPT.get(lang.strip("_"))


def script_share(text: str, script: str) -> float:
    """Share of letters (unicode word characters, no digits or '_') in `script`."""
    letters = re.findall(r"[^\W\d_]", text)
    if not letters:
        return 0.0
    return len(re.findall(f"[{_SCRIPTS[script]}]", "".join(letters))) / len(letters)


def _nonspace(s: str) -> int:
    return len(re.sub(r"\s", "", s))


def _repetitive(src: str, tgt: str) -> bool:
    m = _REPEAT.search(tgt)
    if m and m.group(1).strip() and m.group(0) not in src:
        return True
    words = tgt.split()
    grams = list(zip(words, words[1:], words[2:], strict=False))
    return len(words) >= 30 and len(set(grams)) < 0.3 * len(grams)


def check(
    src_sents: list[str], tgt_sents: list[str], tgt_lang: str, cfg: FilterConfig
) -> str | None:
    """The rejection reason of one translated story (sentence lists aligned), or None."""
    src, tgt = " ".join(src_sents), " ".join(tgt_sents)
    script = script_of(tgt_lang)
    for reason in cfg.enabled:
        if reason == "empty":
            if not tgt.strip() or any(
                s.strip() and not t.strip() for s, t in zip(src_sents, tgt_sents, strict=True)
            ):
                return reason
        elif reason == "repetition" and _repetitive(src, tgt):
            return reason
        elif reason == "length_ratio":
            ratio = _nonspace(tgt) / max(1, _nonspace(src))
            if not cfg.min_ratio <= ratio <= cfg.max_ratio:
                return reason
            for s, t in zip(src_sents, tgt_sents, strict=True):
                if len(s) >= 40 and _nonspace(t) < cfg.min_sentence_ratio * _nonspace(s):
                    return reason
        elif reason == "untranslated" and script and script != "Latn":
            if script_share(tgt, "Latn") > cfg.max_latin:
                return reason
            if any(
                len(s) >= 12 and s.strip() == t.strip()
                for s, t in zip(src_sents, tgt_sents, strict=True)
            ):
                return reason
        elif reason == "wrong_script" and script in _SCRIPTS:
            if script_share(tgt, script) < cfg.min_script:
                return reason
    return None
