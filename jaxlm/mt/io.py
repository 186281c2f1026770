"""Story inputs for translation: text files and JSON Lines, stable ids, and sharding.

* `.txt` (any non-JSONL file): stories separated by `<|endoftext|>` when the file contains it,
  else by blank lines.
* `.jsonl` / `.json`: one object per line with a text field (default `text`) and an optional id
  field (default `id`).

Ids are stable across runs: the given id, else `h` + the first 16 hex digits of the SHA-1 of the
text (a repeated text gets `-2`, `-3`, ... in file order). A story belongs to shard
`int(sha1(id)[:8], 16) % N`, so N workers translate disjoint parts that cover the whole input.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jaxlm.data.readers import json_lines
from jaxlm.errors import UserError

_EOT = "<|endoftext|>"


@dataclass(frozen=True)
class Story:
    """One input story."""

    id: str
    text: str


def content_id(text: str) -> str:
    return "h" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _split_text(raw: str) -> list[str]:
    parts = raw.split(_EOT) if _EOT in raw else re.split(r"\n[ \t]*\n", raw)
    return [p.strip() for p in parts if p.strip()]


def _jsonl_rows(path: Path, text_field: str, id_field: str) -> list[tuple[str | None, str]]:
    rows = []
    for where, obj in json_lines(path):  # a byte order mark is dropped
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise UserError(f"{where}: no string field {text_field!r} (--text-field)")
        given = obj.get(id_field)
        rows.append((None if given is None else str(given), obj[text_field].strip()))
    return rows


def read_stories(
    paths: Sequence[str | Path], text_field: str = "text", id_field: str = "id"
) -> list[Story]:
    """All stories of the inputs, in order, with unique stable ids."""
    rows: list[tuple[str | None, str]] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise UserError(f"input {p} not found")
        if p.suffix in (".jsonl", ".json"):
            rows += _jsonl_rows(p, text_field, id_field)
        else:
            try:
                raw = p.read_bytes().decode("utf-8-sig")  # a byte order mark is not text
            except UnicodeDecodeError as e:
                raise UserError(f"{p}: not UTF-8 text (byte {e.start})") from e
            rows += [(None, t) for t in _split_text(raw)]
    stories: list[Story] = []
    seen: dict[str, int] = {}  # id -> how many stories had it (a repeated text: -2, -3, ...)
    for given, text in rows:
        sid = given if given is not None else content_id(text)
        if sid in seen:
            if given is not None:
                raise UserError(f"duplicate id {sid!r} in the input")
            seen[sid] += 1
            sid = f"{sid}-{seen[sid]}"
        seen.setdefault(sid, 1)
        stories.append(Story(sid, text))
    return stories


def parse_shard(spec: str | None) -> tuple[int, int]:
    """'i/N' -> (i, N); None -> (0, 1)."""
    if not spec:
        return 0, 1
    m = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise UserError(f"--shard {spec!r}: expected i/N with 0 <= i < N, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def shard_of(story_id: str, n: int) -> int:
    return int(hashlib.sha1(story_id.encode("utf-8")).hexdigest()[:8], 16) % n
