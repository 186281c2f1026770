"""Word lists from files (names, vocabularies): one reader for the artifact metrics and TSEA.

`NAME=FILE` or `NAME=FILE#COLUMN` names a list on the command line (`jaxlm eval artifacts
--names`, `jaxlm sae tsea --names`); `load_word_list` reads a .txt file (one word or name a line) or
a TSV/CSV column by its header name.
"""

from __future__ import annotations

import csv
from pathlib import Path

from jaxlm.errors import UserError


def load_word_list(path: str | Path, column: str | None = None) -> list[str]:
    """Words from a file: one per line (.txt), or a TSV/CSV column (by header name; default first).

    `../shared/data/names/english_first_names_arabic_script.tsv` has the columns
    `english, arabic, ...`: read it with column="arabic" for the Arabic-script spellings.
    """
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8-sig")  # a byte order mark is not a word
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read word list ({e})") from None
    if p.suffix.lower() not in (".tsv", ".csv"):
        if column is not None:
            raise UserError(f"{p}: column {column!r} given but the file is not a .tsv or .csv")
        words = [line.strip() for line in text.splitlines()]
    else:
        rows = list(csv.reader(text.splitlines(), delimiter="\t" if p.suffix == ".tsv" else ","))
        if not rows:
            raise UserError(f"{p}: empty file")
        header = [h.strip() for h in rows[0]]
        if column is not None and column not in header:
            raise UserError(f"{p}: no column {column!r}; the header has {', '.join(header)}")
        j = 0 if column is None else header.index(column)
        words = [r[j].strip() for r in rows[1:] if len(r) > j]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise UserError(f"{p}: no words in it")
    return words


def parse_names_spec(spec: str) -> tuple[str, Path, str | None]:
    """`NAME=FILE` or `NAME=FILE#COLUMN` (a TSV/CSV column) -> (name, path, column)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise UserError(f"--names {spec!r}: expected NAME=FILE or NAME=FILE#COLUMN")
    path, _, column = rest.partition("#")
    return name, Path(path), column or None


def demo_word_lists() -> dict[str, list[str]]:
    """The demo corpus' own name lists: transliterated English names and Arabic names."""
    from jaxlm.data.demo_corpus import ARABIC_NAMES, ENGLISH_NAMES_AR

    return {
        "english_names": [n for n, _ in ENGLISH_NAMES_AR],
        "arabic_names": [n for n, _ in ARABIC_NAMES],
    }


def word_lists(specs: list[str]) -> dict[str, list[str]]:
    """{NAME: words} of `--names NAME=FILE[#COLUMN]` specs, in the order given (attribute's and
    ablate's contrasts take the first as the positive side)."""
    lists = {}
    for spec in specs:
        name, path, column = parse_names_spec(spec)
        lists[name] = load_word_list(path, column)
    return lists
