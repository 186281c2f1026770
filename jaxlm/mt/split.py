"""A sentence splitter that keeps quoted dialogue whole and round-trips exactly.

`split_sentences(text)` returns pieces whose concatenation is `text`, byte for byte: each piece is
one sentence with the whitespace that follows it. A boundary is placed

* at every newline (paragraph and line breaks are kept as they are), and
* after a run of terminal punctuation (`. ! ? … ؟`), optionally followed by closing quotes or
  brackets, then whitespace, when the next character is not a lower-case letter and the period
  does not end a known abbreviation ("Mr.", "Mrs.", ...),

but never inside a quotation: matched `"..."`, `“...”` and `«...»` spans are protected, so
`"Wow! Look!" said Tom.` stays one sentence. An unmatched quote mark protects nothing.
"""

from __future__ import annotations

import re

_PAIRS = {"“": "”", "«": "»"}
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "prof", "mt"})
_TERMINAL = ".!?…؟"
_CLOSERS = "\"”»’')]"
_CANDIDATE = re.compile(rf"[{re.escape(_TERMINAL)}]+[{re.escape(_CLOSERS)}]*(\s+)")
_WORD_BEFORE = re.compile(r"(\w+)\.$")


def _protected_spans(text: str) -> list[tuple[int, int]]:
    """(open, close) index pairs of matched quotations, outermost and innermost alike."""
    spans = []
    straight = [i for i, c in enumerate(text) if c == '"']
    spans += list(zip(straight[0::2], straight[1::2], strict=False))
    for opener, closer in _PAIRS.items():
        stack = []
        for i, c in enumerate(text):
            if c == opener:
                stack.append(i)
            elif c == closer and stack:
                spans.append((stack.pop(), i))
    return spans


def _inside(pos: int, spans: list[tuple[int, int]]) -> bool:
    return any(a < pos <= b for a, b in spans)  # few spans per paragraph: a scan is enough


def split_sentences(text: str) -> list[str]:
    """Split `text` into sentence pieces (each with its trailing whitespace); `"".join` == text."""
    spans = _protected_spans(text)
    cuts = []
    for m in _CANDIDATE.finditer(text):
        end_punct, cut = m.start(1), m.end(1)
        ws = m.group(1)
        if "\n" not in ws:
            if _inside(end_punct, spans):
                continue
            nxt = text[cut : cut + 1]
            if nxt and nxt.islower():
                continue
            before = _WORD_BEFORE.search(text[max(0, m.start() - 12) : m.start() + 1])
            if before and text[m.start()] == "." and before.group(1).lower() in _ABBREVIATIONS:
                continue
        cuts.append(cut)
    cuts += [m.end() for m in re.finditer(r"\n\s*", text)]
    pieces, start = [], 0
    for cut in sorted(set(cuts)):
        if start < cut < len(text):
            pieces.append(text[start:cut])
            start = cut
    pieces.append(text[start:])
    return [p for p in pieces if p]


def strip_piece(piece: str) -> tuple[str, str, str]:
    """(leading whitespace, sentence, trailing whitespace) of one piece."""
    core = piece.strip()
    if not core:
        return piece, "", ""
    lead = piece[: len(piece) - len(piece.lstrip())]
    return lead, core, piece[len(lead) + len(core) :]
