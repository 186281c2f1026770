"""The pipeline's corpus from files: translated and native stories split into training, control
and held-out evaluation sets.

A story's set is decided by the SHA-1 of its text (the lowest hashes are held out), so the split
does not depend on file order and the same file always splits the same way:

  translated -> eval_translated (corpus.eval_stories) + control (as many as the native training
                stories: the control run's budget) + translated (the rest: pretraining)
  native     -> eval_native (corpus.eval_stories) + native (the rest: continual pre-training)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from jaxlm.errors import UserError


def _stories(path: Path, field: str):
    from jaxlm.data.readers import ReadOptions, read

    return read(str(path), options=ReadOptions(field=field))


def _order(path: Path, field: str) -> np.ndarray:
    """Each story's rank by the hash of its text (0 = lowest)."""
    h = [int(hashlib.sha1(s.encode("utf-8")).hexdigest()[:15], 16) for s in _stories(path, field)]
    if not h:
        raise UserError(f"{path}: no stories in it")
    ranks = np.empty(len(h), np.int64)
    ranks[np.argsort(np.asarray(h, np.int64), kind="stable")] = np.arange(len(h))
    return ranks


def _write(path: Path, field: str, ranks: np.ndarray, bins: list[tuple[str, int]], out: Path):
    """Stories by rank into bins: the first `n` ranks to the first bin, and so on; the last bin
    takes the rest (n = -1)."""
    files = {name: open(out / f"{name}.jsonl", "w", encoding="utf-8") for name, _ in bins}
    bounds, lo = [], 0
    for name, n in bins:
        hi = lo + n if n >= 0 else len(ranks)
        bounds.append((name, lo, hi))
        lo = hi
    counts = dict.fromkeys(files, 0)
    try:
        for i, text in enumerate(_stories(path, field)):
            name = next(b for b, a, z in bounds if a <= ranks[i] < z)
            files[name].write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            counts[name] += 1
    finally:
        for f in files.values():
            f.close()
    return counts


def split_files(method, ctx) -> dict:
    """The corpus stage for `corpus.kind: files`."""
    c = method.cfg.corpus
    out = method.w / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    if c.english:
        translated, field = out / "translated.full.jsonl", "text"
    else:
        translated, field = method.path(c.translated), c.field
    if c.native:
        native, nfield = method.path(c.native), c.field
    else:
        native, nfield = out / "native.full.jsonl", "text"
    for p in (translated, native):
        if not p.is_file():
            raise UserError(f"corpus: {p} not found")
    n_ranks = _order(native, nfield)
    if len(n_ranks) <= c.eval_stories:
        raise UserError(f"{native}: {len(n_ranks)} stories, not more than corpus.eval_stories")
    result = _write(native, nfield, n_ranks, [("eval_native", c.eval_stories), ("native", -1)],
                    out)  # fmt: skip
    t_ranks = _order(translated, field)
    control = result["native"] if method.cfg.models.control else 0
    if len(t_ranks) <= c.eval_stories + control:
        raise UserError(f"{translated}: too few stories for the held-out and control sets")
    bins = [("eval_translated", c.eval_stories), ("control", control), ("translated", -1)]
    result |= _write(translated, field, t_ranks, bins, out)
    ctx.commands.append(f"(split {translated} and {native} by the SHA-1 of each story)")
    return {name: {"stories": n} for name, n in result.items()}
