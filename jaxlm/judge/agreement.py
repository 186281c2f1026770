"""How far a judge agrees with itself (the same items graded twice) or with another judge.

A difference between two models means little if the judge's own grades of one story move by as
much when asked again. `agreement` pairs two grades of the same item (same story id, beginning
and completion) and reports, per score: Pearson and Spearman correlation (Spearman on average
ranks of ties), the mean absolute difference with a bootstrap 95% interval over stories, the
mean signed difference (second - first: a judge that is systematically harsher shows here), and
the shares of pairs that agree exactly or within one point; for the age group, exact and
within-one-letter agreement.

Pairs come from one file graded with `judge grade --repeat K` (K >= 2: every pair of repeats
i < j of a story) or from two files of the same completions (a rerun at temperature > 0, or a
second judge model: grades of the same repeat index are paired). The interval resamples stories
with all their pairs (a cluster bootstrap), so K repeats do not pass for K times the stories.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np

from jaxlm.errors import UserError
from jaxlm.judge.stats import (
    AGE_GROUPS,
    LEVEL,
    RESAMPLES,
    SCORES,
    bootstrap_ci,
    load_grades,
    match_stories,
    per_story,
    round4,
    source,
)

Pairs = list[tuple[dict, dict]]  # (first grade, second grade) of one item


def pairs_within(records: list[dict]) -> Pairs:
    """Every pair of repeats (i < j) of each story of one file."""
    by_story: dict = {}
    for r in records:
        by_story.setdefault(r["id"], []).append(r)
    out: Pairs = []
    for rs in by_story.values():
        out += combinations(sorted(rs, key=lambda r: r["repeat"]), 2)
    return out


def pairs_between(a: list[dict], b: list[dict]) -> tuple[Pairs, dict]:
    """(pairs, report of unmatched stories): grades of the same item and repeat index."""
    ids, unmatched = match_stories(per_story(a), per_story(b), same_completion=True)
    index = {(r["id"], r["repeat"]): r for r in b}
    keep = set(ids)
    pairs: Pairs = []
    for r in a:
        other = index.get((r["id"], r["repeat"])) if r["id"] in keep else None
        if other is not None:
            pairs.append((r, other))
    return pairs, unmatched


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """None where a side is constant (the correlation is undefined, not 0 or 1)."""
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..N, tied values sharing their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        ranks[x == v] = ranks[x == v].mean()
    return ranks


def figures(pairs: Pairs, *, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """The agreement figures of a list of pairs (see the module docstring); JSON-ready."""
    if not pairs:
        raise UserError("no item is graded twice: nothing to measure agreement on")
    x = np.array([[p[0][k] for k in SCORES] for p in pairs], dtype=np.float64)  # [P, 4]
    y = np.array([[p[1][k] for k in SCORES] for p in pairs], dtype=np.float64)  # [P, 4]
    stories: dict[str | int, int] = {}  # story id -> its index
    story = np.array([stories.setdefault(p[0]["id"], len(stories)) for p in pairs])  # [P]
    absdiff = np.abs(y - x)
    sums = np.zeros((len(stories), len(SCORES)))  # [N, 4] per-story sums of |diff|
    np.add.at(sums, story, absdiff)
    counts = np.bincount(story, minlength=len(stories)).astype(np.float64)  # [N]
    ci = bootstrap_ci(
        len(stories), lambda idx: sums[idx].sum(1) / counts[idx].sum(1)[:, None],
        resamples=resamples, seed=seed,
    )  # fmt: skip
    scores = {}
    for j, k in enumerate(SCORES):
        scores[k] = {
            "pearson": round4(_pearson(x[:, j], y[:, j])),
            "spearman": round4(_pearson(_ranks(x[:, j]), _ranks(y[:, j]))),
            "mean_abs_diff": round4(absdiff[:, j].mean()),
            "mean_abs_diff_ci95": [round4(ci[0, j]), round4(ci[1, j])],
            "mean_diff_second_minus_first": round4((y[:, j] - x[:, j]).mean()),
            "exact": round4((absdiff[:, j] == 0).mean()),
            "within_1": round4((absdiff[:, j] <= 1).mean()),
        }
    age = np.array([[AGE_GROUPS.index(p[i]["age_group"]) for i in (0, 1)] for p in pairs])
    gap = np.abs(age[:, 1] - age[:, 0])
    return {
        "stories": len(stories), "pairs": len(pairs), "scores": scores,
        "age_group": {"exact": round4((gap == 0).mean()), "within_1": round4((gap <= 1).mean())},
        "bootstrap": {"resamples": resamples, "seed": seed, "level": LEVEL, "unit": "story"},
    }  # fmt: skip


def agreement(paths: list[str | Path], *, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Agreement between the repeats of one grades file, or between two files' grades."""
    if len(paths) not in (1, 2):
        raise UserError(f"give one grades file (its repeats) or two, not {len(paths)}")
    if len(paths) == 2 and Path(paths[0]).resolve() == Path(paths[1]).resolve():
        raise UserError(f"{paths[0]} is named twice; give it once to compare its repeats")
    records = [load_grades(p) for p in paths]
    out = {"files": [str(p) for p in paths], "sources": [source(r[0]) for r in records]}
    if len(paths) == 1:
        pairs = pairs_within(records[0])
        if not pairs:
            raise UserError(
                f"{paths[0]}: no story is graded twice; grade with --repeat 2 or give two files"
            )
        return out | {"mode": "repeats"} | figures(pairs, resamples=resamples, seed=seed)
    pairs, unmatched = pairs_between(*records)
    if not pairs:
        raise UserError(f"{paths[0]} and {paths[1]} share no graded item (story and completion)")
    out |= {"mode": "two files", "unmatched": unmatched}
    return out | figures(pairs, resamples=resamples, seed=seed)
