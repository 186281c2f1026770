"""Append-only JSON Lines files that survive being killed mid-write.

Each record is written as one line with a single `write`, then flushed and fsynced by `append`.
A process killed mid-write can leave only a torn last line (no trailing newline): `JsonlStore.open`
cuts it off before appending, and `read_jsonl` ignores it. A complete line that is not JSON is a
real corruption and raises `UserError` with its line number. The file's lock (`jaxlm.outputs.Lock`:
`.NAME.lock` beside it) keeps two writers off one file and names the one holding it; a command
that holds the file's `jaxlm.outputs.Output` already opens it with `lock=False`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from jaxlm.errors import UserError
from jaxlm.outputs import Lock


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Records of a JSON Lines file, skipping a torn (newline-less) last line."""
    path = Path(path)
    if not path.exists():
        return
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                return  # torn tail of a killed writer
            if not raw.strip():
                continue
            try:
                yield json.loads(raw)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path}:{lineno}: not a JSON line ({e.msg}); fix or remove it"
                ) from e


def repair_torn_tail(path: Path) -> int:
    """Truncate a newline-less last line; returns the number of bytes removed."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with path.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        block = min(size, 1 << 16)
        keep = 0
        pos = size
        while pos > 0:  # find the last newline, reading backwards in blocks
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


class JsonlStore:
    """One writer's append handle on a JSON Lines file (use as a context manager).

    `lock=False`: the caller holds the file's lock already (its `jaxlm.outputs.Output`)."""

    def __init__(self, path: str | Path, *, lock: bool = True):
        self.path = Path(path)
        self._f: BinaryIO | None = None
        self._lock = Lock(self.path.resolve()) if lock else None
        self.repaired_bytes = 0

    def open(self) -> JsonlStore:
        if self._lock is not None:
            self._lock.acquire()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = self.path.open("ab")
            self.repaired_bytes = repair_torn_tail(self.path)
        except BaseException:
            self.close()
            raise
        return self

    def append(self, records: Iterable[dict]) -> int:
        """Write records (one line each), then flush and fsync; returns how many were written."""
        data = b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8") for r in records)
        if data:
            if self._f is None:
                raise RuntimeError(f"{self.path}: append before open")
            self._f.write(data)
            self._f.flush()
            os.fsync(self._f.fileno())
        return data.count(b"\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> JsonlStore:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Write a whole file (fsynced); returns the number of records. Made whole, it is written
    into an atomic `jaxlm.outputs.Output`'s `tmp` and published from there."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    return n
