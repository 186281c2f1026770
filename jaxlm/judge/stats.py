"""Summaries of graded completions with bootstrap intervals, and paired comparisons of models.

The unit of every statistic is a story beginning: a model's score on a story is the mean of its
grades of that story (one grade, or K with `judge grade --repeat K`), and intervals come from the
percentile bootstrap over stories (Efron; `RESAMPLES` resamples of the stories with replacement, a
seeded generator, the 2.5th and 97.5th percentiles with numpy's linear interpolation). The
percentile bootstrap is the textbook choice for a mean of bounded scores; with a few dozen
stories it is slightly too narrow, which the summary cannot fix: grade more stories.

`compare` is paired: model B's and model A's completions of the *same* beginnings (same story id
and the same beginning text) are compared story by story, so the interval on B - A is free of
the story-to-story spread that two separate intervals would double count.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.data.readers import text_lines
from jaxlm.errors import UserError

SCORES = ("grammar", "creativity", "consistency", "plot")  # TinyStories' grades, out of 10
AGE_GROUPS = "ABCDEF"  # A: 3 or under ... F: 13-16
# what made a grade: the checkpoint that wrote the completion, and the judge (model, prompt
# version, sampling temperature); one grades file holds one source
SOURCE_FIELDS = ("checkpoint", "judge_model", "prompt_version", "temperature")
ITEM_FIELDS = ("id", "prompt_sha256", "completion_sha256", "repeat")  # one grade of one item
RESAMPLES = 2000
LEVEL = 0.95


# ---------------------------------------------------------------------------- reading grades


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """("path:line", record) for each line of a grades file; a torn (newline-less) last line, as
    a killed writer leaves it, is skipped; anything else that is not a JSON object is an error."""
    out = []
    for lineno, line in text_lines(path):
        if not line.endswith("\n"):
            break
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not a JSON line ({e.msg})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object (a grade)")
        out.append((f"{path}:{lineno}", obj))
    return out


def check_grade(where: str, r: dict) -> None:
    """`UserError` naming `where` unless `r` is a whole grade (key, source, scores, age)."""
    for k in (*ITEM_FIELDS, *SOURCE_FIELDS, *SCORES, "age_group"):
        if k not in r:
            hint = " (graded with an older prompt? regrade with --overwrite)" if k != "id" else ""
            raise UserError(f"{where}: missing field {k!r}{hint}")
    if isinstance(r["id"], bool) or not isinstance(r["id"], str | int):
        raise UserError(f"{where}: id={r['id']!r} is not a string or an integer")
    for k in SCORES:
        v = r[k]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10:
            raise UserError(f"{where}: {k}={v!r} is not an integer score from 1 to 10")
    if r["age_group"] not in tuple(AGE_GROUPS):
        raise UserError(f"{where}: age_group={r['age_group']!r} is not one of A..F")
    if isinstance(r["repeat"], bool) or not isinstance(r["repeat"], int) or r["repeat"] < 0:
        raise UserError(f"{where}: repeat={r['repeat']!r} is not an index >= 0")


def source(r: dict) -> dict:
    """The checkpoint and judge that made a grade (missing fields read as None)."""
    return {k: r.get(k) for k in SOURCE_FIELDS}


def describe(src: dict) -> str:
    """A source in words, for messages: checkpoint, judge model, prompt version, temperature."""
    ckpt = repr(src["checkpoint"]) if src["checkpoint"] is not None else "(none recorded)"
    return (
        f"checkpoint {ckpt} judged by {src['judge_model']!r} "
        f"(prompt version {src['prompt_version']!r}, temperature {src['temperature']})"
    )


def load_grades(path: str | Path, *, allow_empty: bool = False) -> list[dict]:
    """The validated grades of a file; `UserError` naming the file (and line) otherwise.

    One file holds one source (checkpoint and judge): grades of another source, two different
    completions (or beginnings) of one story id, or one repeat graded twice are refused rather
    than averaged.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such grades file")
    records: list[dict] = []
    items: dict[str | int, tuple[str, str]] = {}  # story id -> (prompt, completion) sha256
    seen: set[tuple[str | int, int]] = set()  # (story id, repeat)
    for where, r in read_records(path):
        check_grade(where, r)
        if records and source(r) != source(records[0]):
            raise UserError(
                f"{where}: a grade of {describe(source(r))}, but the file's first grade is of "
                f"{describe(source(records[0]))}; keep one source per file"
            )
        item = (r["prompt_sha256"], r["completion_sha256"])
        if items.setdefault(r["id"], item) != item:
            raise UserError(f"{where}: story {r['id']!r} has a second, different completion")
        if (r["id"], r["repeat"]) in seen:
            raise UserError(f"{where}: story {r['id']!r} repeat {r['repeat']} is graded twice")
        seen.add((r["id"], r["repeat"]))
        records.append(r)
    if not records and not allow_empty:
        raise UserError(f"{path}: no graded records")
    return records


def per_story(records: list[dict]) -> dict:
    """{story id: {"prompt_sha256", "completion_sha256", score: mean over its repeats}}."""
    groups: dict = defaultdict(list)
    for r in records:
        groups[r["id"]].append(r)
    return {
        sid: {
            "prompt_sha256": rs[0]["prompt_sha256"],
            "completion_sha256": rs[0]["completion_sha256"],
        }
        | {k: sum(r[k] for r in rs) / len(rs) for k in SCORES}
        for sid, rs in groups.items()
    }


# ---------------------------------------------------------------------------- the bootstrap


def bootstrap_ci(
    n: int,
    statistic: Callable[[np.ndarray], np.ndarray],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> np.ndarray:
    """Percentile bootstrap interval(s): [2, K] (lower row, upper row).

    `statistic` maps resampled row indices [R, n] (R resamples of the n stories, with
    replacement) to [R, K] values of K statistics; one set of resamples serves all K, so the
    intervals of several scores come from the same resampled story sets.
    """
    if n < 1:
        raise ValueError("the bootstrap needs at least one story")
    if resamples < 1000:
        raise UserError(f"resamples={resamples}: use at least 1000 for a 95% interval")
    rng = np.random.default_rng(seed)
    chunk = max(1, (1 << 22) // n)  # bounded memory for the [R, n] index block
    stats = []
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))  # [R, n]
        stats.append(np.asarray(statistic(idx)).reshape(len(idx), -1))
    tail = 100 * (1 - level) / 2
    return np.percentile(np.concatenate(stats), [tail, 100 - tail], axis=0)  # [2, K]


def round4(x: float | None) -> float | None:
    """x rounded to 4 decimals as a Python float (JSON-ready); None stays None."""
    return None if x is None else round(float(x), 4)


def mean_ci(values: np.ndarray, **kw) -> tuple[np.ndarray, np.ndarray]:
    """(mean [K], interval [2, K]) of the columns of values [N, K]: bootstrap over the N rows."""
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    return values.mean(0), bootstrap_ci(len(values), lambda idx: values[idx].mean(1), **kw)


# ---------------------------------------------------------------------------- one model


def summarize(records: list[dict], *, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Per score: mean over stories, sample std, bootstrap 95% interval; age-group counts.

    A story's score is the mean of its repeats, so K repeats sharpen each story's score without
    pretending to be K times as many stories.
    """
    stories = per_story(records)
    values = np.array([[s[k] for k in SCORES] for s in stories.values()])  # [N, 4]
    mean, ci = mean_ci(values, resamples=resamples, seed=seed)
    std = values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(SCORES))
    out: dict[str, Any] = {"n_stories": len(stories), "n_grades": len(records)}
    out |= source(records[0])  # one source per file (load_grades)
    for j, k in enumerate(SCORES):
        out[k] = {
            "mean": round4(mean[j]),
            "std": round4(std[j]),
            "ci95": [round4(ci[0, j]), round4(ci[1, j])],
        }
    out["age_groups"] = dict(sorted(Counter(r["age_group"] for r in records).items()))
    out["bootstrap"] = {"resamples": resamples, "seed": seed, "level": LEVEL, "unit": "story"}
    return out


# ---------------------------------------------------------------------------- paired comparison


def match_stories(a: dict, b: dict, *, same_completion: bool = False) -> tuple[list, dict]:
    """(ids in both with the same beginning, report of the rest) for two `per_story` tables.

    Items match by story id and the same beginning text (its sha256); with `same_completion`
    also the same completion (the same item graded twice). The report counts what was left out,
    with the first few ids of each kind.
    """
    fields = ("prompt_sha256", "completion_sha256") if same_completion else ("prompt_sha256",)
    both = [sid for sid in a if sid in b]
    matched = [sid for sid in both if all(a[sid][f] == b[sid][f] for f in fields)]
    left = {
        "only_in_first": [sid for sid in a if sid not in b],
        "only_in_second": [sid for sid in b if sid not in a],
        "text_differs": [sid for sid in both if sid not in set(matched)],
    }
    return matched, {k: {"n": len(v), "ids": v[:10]} for k, v in left.items()}


def paired(a: dict, b: dict, *, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """B - A per score on the stories both graded: mean difference, paired bootstrap 95%
    interval, and the shares of stories where B is better, A is better, or they tie."""
    ids, unmatched = match_stories(a, b)
    out = {"matched": len(ids), "unmatched": unmatched}
    if not ids:
        return out | {"scores": None}
    va = np.array([[a[s][k] for k in SCORES] for s in ids])  # [N, 4]
    vb = np.array([[b[s][k] for k in SCORES] for s in ids])  # [N, 4]
    d = vb - va
    mean, ci = mean_ci(d, resamples=resamples, seed=seed)
    scores = {}
    for j, k in enumerate(SCORES):
        win, loss = int((d[:, j] > 1e-9).sum()), int((d[:, j] < -1e-9).sum())
        scores[k] = {
            "mean_a": round4(va[:, j].mean()), "mean_b": round4(vb[:, j].mean()),
            "diff_b_minus_a": round4(mean[j]), "ci95": [round4(ci[0, j]), round4(ci[1, j])],
            "b_better": round4(win / len(ids)), "a_better": round4(loss / len(ids)),
            "ties": round4((len(ids) - win - loss) / len(ids)),
        }  # fmt: skip
    return out | {"scores": scores}


def compare(paths: list[str | Path], *, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Each file's summary, then every later file paired against the first (B - A).

    Pairs against the first, so `compare base.jsonl cpt.jsonl other.jsonl` reads as two
    comparisons with the base model; files graded by different judges (model, prompt version or
    temperature) are compared but warned about, since their difference mixes models and judges.
    """
    if len(paths) != len({str(Path(p).resolve()) for p in paths}):
        raise UserError("the same grades file is named twice")
    records = [load_grades(p) for p in paths]
    out: dict[str, Any] = {"files": [str(p) for p in paths], "warnings": []}
    out["summaries"] = [summarize(r, resamples=resamples, seed=seed) for r in records]
    tables = [per_story(r) for r in records]
    out["comparisons"] = []
    for p, r, t in zip(paths[1:], records[1:], tables[1:], strict=True):
        pair = {"a": str(paths[0]), "b": str(p)}
        pair |= paired(tables[0], t, resamples=resamples, seed=seed)
        out["comparisons"].append(pair)
        judge_a, judge_b = source(records[0][0]), source(r[0])
        if {**judge_a, "checkpoint": 0} != {**judge_b, "checkpoint": 0}:
            out["warnings"].append(f"{paths[0]} and {p} were graded by different judges")
        if not pair["matched"]:
            out["warnings"].append(f"{paths[0]} and {p} share no story beginning")
    return out
