"""Step 4 of the method: grade story completions with an LLM, as TinyStories (Eldan & Li 2023) does.

A model is given the beginning of a story and completes it (`make_judge_inputs`); a strong LLM
(Gemini, or any OpenAI-compatible endpoint through `jaxlm.llm`) then grades the completion as a
teacher grades a student (`judge_file`): a short free-text assessment, then scores out of 10 for
grammar, creativity, consistency with the beginning and plot (TinyStories' later evaluations
grade plot too), and a guess of the writer's age group (A: 3 or under, B: 4-5, C: 6-7, D: 8-9,
E: 10-12, F: 13-16).

The grading prompt is in English, with the Arabic story quoted verbatim: judge models follow
English instructions most reliably, and an English assessment can be read by everyone on the
project. It asks the judge to grade *Arabic* (Modern Standard Arabic grammar, agreement of gender
and number), shows the beginning and the completion separated by `***` (TinyStories' marker, so a
sentence cut in the middle stays visible), and asks for one final JSON line
`{"grammar": g, "creativity": c, "consistency": k, "plot": p, "age_group": "C"}`. TinyStories used
two turns (assessment, then grades); one turn with a machine-readable last line costs half the
calls. `PROMPT_VERSION` names the prompt: it is bumped whenever the prompt or the parser's demands
change, and it is part of every grade's key.

`parse_grade` reads that JSON line, or failing that "Grammar: 8/10"-style lines (English or
Arabic labels, Western or Arabic-Indic digits); anything else, an answer without plot included,
raises `MalformedGrade`, and the judge is re-asked (with a reminder, at temperature >= 0.7) up to
`max_retries_malformed` times.

Grades are append-only JSON Lines through `jaxlm.store`, keyed by (story id, sha256 of the
beginning, sha256 of the completion, judge model, prompt version, temperature, repeat index) and
carrying the checkpoint that wrote the completion. A rerun skips an item only when a grade with
its full key exists. A grades file holds one source (checkpoint and judge): one that holds grades
of another checkpoint, judge or prompt version, or of completions the inputs no longer hold, is
refused in one line, never answered with its old grades; `overwrite` regrades into a side file
that replaces it atomically at the end. The grades file's lock (`jaxlm.outputs.Lock`) is held for
the whole run, so a second run on it is refused in one line naming the first. Items that fail
for good are counted in the summary and not written, so a rerun tries them again. The API key
lives only inside the client, which redacts it from every error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from jaxlm.data.readers import json_lines
from jaxlm.errors import UserError
from jaxlm.judge.agreement import figures, pairs_within
from jaxlm.judge.stats import (
    SCORES,
    check_grade,
    describe,
    load_grades,
    read_records,
    source,
    summarize,
)
from jaxlm.llm import AuthError, LLMClient, LLMError, RequestError
from jaxlm.outputs import Lock, check_writable
from jaxlm.store import JsonlStore

AGE_GROUPS = {"A": "3 or under", "B": "4-5", "C": "6-7", "D": "8-9", "E": "10-12", "F": "13-16"}
SEPARATOR = "***"
PROMPT_VERSION = "v2-plot"  # v1: grammar, creativity, consistency; v2 adds plot

PROMPT = """\
In the following exercise, the student is given the beginning of a story written in Arabic. \
The student needs to complete it into a full story, in Arabic. The exercise tests the student's \
language abilities and creativity. The symbol {sep} marks the separator between the prescribed \
beginning and the student's completion:

{beginning} {sep} {completion}

First, give your general assessment of the part written by the student (the text after the \
{sep} symbol), in a few English sentences. Is it grammatically correct Arabic (agreement of \
gender and number, verb forms, spelling)? Is it consistent with the beginning of the story? Pay \
special attention to whether the student manages to complete the sentence which is split in the \
middle by the separator {sep}. Does the plot make sense?

Then grade the student's completion, each score an integer from 1 to 10: grammar, creativity, \
consistency with the story's beginning, and plot (does the story go somewhere coherent and reach \
an ending?). Also give your best guess of the student's age, as reflected by the completion, as \
one letter: A: 3 or under. B: 4-5. C: 6-7. D: 8-9. E: 10-12. F: 13-16.

End your answer with exactly one line of JSON and nothing after it, for example:
{{"grammar": 7, "creativity": 5, "consistency": 8, "plot": 6, "age_group": "C"}}"""

REMINDER = """

Your previous answer could not be read. Remember to end with one line of JSON with integer \
scores from 1 to 10 for grammar, creativity, consistency and plot, and an age group letter from \
A to F, for example:
{"grammar": 7, "creativity": 5, "consistency": 8, "plot": 6, "age_group": "C"}"""


class MalformedGrade(ValueError):
    """A judge answer without readable scores (re-asked, then counted as a failure)."""


@dataclass(frozen=True)
class Grade:
    """One parsed judgement."""

    grammar: int
    creativity: int
    consistency: int
    plot: int
    age_group: str  # A..F
    assessment: str  # the judge's free text, without the score line(s)


def make_prompt(beginning: str, completion: str) -> str:
    """The grading prompt for one story: beginning, `***`, completion."""
    return PROMPT.format(sep=SEPARATOR, beginning=beginning.strip(), completion=completion.strip())


# ---------------------------------------------------------------------------- parsing answers

_DIGITS = str.maketrans("٠١٢٣٤٥٦٧٨٩۰۱۲۳۴۵۶۷۸۹", "0123456789" * 2)
_LABELS = {
    "grammar": r"grammar|القواعد|النحو|اللغة",
    "creativity": r"creativity|الإبداع|الابداع",
    "consistency": r"consistency|الاتساق|الانسجام|التماسك",
    "plot": r"plot|الحبكة",
    "age_group": r"age[ _]?group|age|الفئة العمرية|العمر",
}
# A score is a whole number, optionally "/10" or "out of 10"; "4/5" or "7-8" is not one (the judge
# is asked again). An age group is one capital letter, not "a 6-7 year old" nor "A or B".
_NUMBER = r"(\d+(?:\.\d+)?)(?![\d.])\s*(?:(?:/|out of)\s*10\b)?(?!\s*(?:/|-|–|out of)\s*\d)"
_LETTER = r"\(?((?-i:[A-F]))\)?(?!\w)(?!\s*(?:or|/|أو)\s*\(?[A-Fa-f]\b)"
_SCORE_LINE = {
    k: re.compile(rf"(?im)^[\s*#>\-]*(?:{v})\**\s*[:=\-–]\s*\**\s*{_NUMBER}")
    for k, v in _LABELS.items()
    if k != "age_group"
}
_AGE_LINE = re.compile(
    rf"(?im)^[\s*#>\-]*(?:{_LABELS['age_group']})\**\s*[:=\-–]\s*\**\s*{_LETTER}"
)


def _score(value, key: str) -> int:
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.0+)?)\s*(?:/\s*10)?\s*", value.translate(_DIGITS))
        if not m:
            raise MalformedGrade(f"{key}={value!r} is not a score out of 10")
        value = float(m.group(1))
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedGrade(f"{key}={value!r} is not an integer score")
    if not math.isfinite(value) or value != int(value):  # JSON allows NaN and Infinity
        raise MalformedGrade(f"{key}={value!r} is not an integer score")
    if not 1 <= int(value) <= 10:
        raise MalformedGrade(f"{key}={value} is outside 1..10")
    return int(value)


def _age(value) -> str:
    text = str(value).strip()
    m = re.match(_LETTER, text.upper() if len(text) == 1 else text)
    if not m:
        raise MalformedGrade(f"age_group={value!r} is not one of A..F")
    return m.group(1).upper()


def _from_json(text: str) -> tuple[dict, str] | None:
    """(fields, text without the JSON) from the last JSON object naming the scores."""
    for m in reversed(list(re.finditer(r"\{[^{}]*\}", text))):
        try:
            obj = json.loads(m.group(0).translate(_DIGITS))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            obj = {str(k).lower().replace(" ", "_"): v for k, v in obj.items()}
            if any(k in obj for k in SCORES):
                return obj, text[: m.start()] + text[m.end() :]
    return None


def _from_lines(text: str) -> tuple[dict, str] | None:
    """(fields, text before the first score line) from "Grammar: 8/10"-style lines."""
    digits = text.translate(_DIGITS)  # same length: offsets stay valid
    found = {k: p.search(digits) for k, p in _SCORE_LINE.items()}
    found["age_group"] = _AGE_LINE.search(digits)
    hits = [m for m in found.values() if m]
    if not hits:
        return None
    fields = {k: m.group(1) for k, m in found.items() if m}
    return fields, text[: min(m.start() for m in hits)]


def parse_grade(text: str) -> Grade:
    """The scores in a judge's answer (JSON object or labelled lines); else `MalformedGrade`."""
    parsed = _from_json(text) or _from_lines(text)
    if parsed is None:
        raise MalformedGrade(f"no scores found in the answer ({text[:80]!r}...)")
    fields, rest = parsed
    missing = [k for k in (*SCORES, "age_group") if k not in fields]
    if missing:
        raise MalformedGrade(f"the answer lacks {', '.join(missing)}")
    scores = {k: _score(fields[k], k) for k in SCORES}
    assessment = re.sub(r"```(?:json)?", "", rest).strip()
    return Grade(**scores, age_group=_age(fields["age_group"]), assessment=assessment)


def grade_one(
    client: LLMClient,
    beginning: str,
    completion: str,
    *,
    max_retries_malformed: int = 2,
    temperature: float = 0.0,
    max_tokens: int = 1024,
) -> Grade:
    """Ask the judge; re-ask up to `max_retries_malformed` times while its answer is unreadable."""
    prompt = make_prompt(beginning, completion)
    for attempt in range(max_retries_malformed + 1):
        ask = prompt if attempt == 0 else prompt + REMINDER
        temp = temperature if attempt == 0 else max(temperature, 0.7)
        answer = client.complete(ask, temperature=temp, max_tokens=max_tokens)
        try:
            return parse_grade(answer)
        except MalformedGrade as e:
            error = e
    raise MalformedGrade(f"after {max_retries_malformed + 1} answers: {error}")


# ---------------------------------------------------------------------------- judging a file


@dataclass(frozen=True)
class GradeOptions:
    """How `judge_file` grades: concurrency, repeats, resume or replace, the judge's sampling."""

    concurrency: int = 8  # judge calls in flight
    repeat: int = 1  # grades per item (repeat index 0..K-1 in the key); K >= 2 gives agreement
    limit: int | None = None  # grade only the first N inputs
    overwrite: bool = False  # regrade from scratch and replace the grades file atomically
    max_retries_malformed: int = 2  # re-asks after an unreadable answer
    temperature: float = 0.0  # the judge's; part of a grade's key (a repeat wants > 0)
    max_tokens: int = 1024  # per answer

    def __post_init__(self):
        for name, low in (("concurrency", 1), ("repeat", 1), ("max_retries_malformed", 0)):
            if getattr(self, name) < low:
                raise UserError(f"{name}={getattr(self, name)} must be >= {low}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit={self.limit} must be >= 1")
        if not 0 <= self.temperature <= 2 or self.max_tokens < 1:
            raise UserError("temperature must be in [0, 2] and max_tokens >= 1")


def sha256(text: str) -> str:
    """The hex sha256 of a text's UTF-8 bytes (beginnings and completions are keyed by it)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_input(where: str, obj: object) -> dict:
    """`obj` itself once it is a valid input record (else one line naming `where`)."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected an object with id, prompt, completion")
    for key in ("id", "prompt", "completion"):
        if key not in obj:
            raise UserError(f"{where}: missing field {key!r}")
    if not isinstance(obj["id"], str | int) or isinstance(obj["id"], bool):
        raise UserError(f"{where}: field 'id' must be a string or an integer")
    for key in ("prompt", "completion"):
        if not isinstance(obj[key], str):
            raise UserError(f"{where}: field {key!r} must be a string")
    if not isinstance(obj.get("checkpoint"), str | None):
        raise UserError(f"{where}: field 'checkpoint' must be a string")
    return obj


def read_inputs(path: str | Path) -> list[dict]:
    """Judge inputs (`id`, `prompt`, `completion`, optional `checkpoint`, as `judge complete`
    writes them); `UserError` naming the file and line. One file is one model's completions:
    several checkpoints in one file are refused (grade each into its own grades file)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such inputs file")
    items: list[dict] = []
    seen: set[str | int] = set()
    for where, line in json_lines(path):  # a byte order mark is dropped
        obj = _check_input(where, line)
        if obj["id"] in seen:
            raise UserError(f"{where}: duplicate id {obj['id']!r}")
        if items and obj.get("checkpoint") != items[0].get("checkpoint"):
            raise UserError(
                f"{where}: checkpoint {obj.get('checkpoint')!r} differs from the first line's "
                f"{items[0].get('checkpoint')!r}; grade each model's completions into its own file"
            )
        seen.add(obj["id"])
        items.append(obj)
    if not items:
        raise UserError(f"{path}: no inputs")
    return items


def grade_key(r: dict) -> tuple:
    """What makes two grades the same: the item (story, beginning, completion), the judge
    (model, prompt version, temperature) and the repeat index."""
    return (
        r["id"], r["prompt_sha256"], r["completion_sha256"], r["judge_model"],
        r["prompt_version"], r["temperature"], r["repeat"],
    )  # fmt: skip


def _record(item: dict, repeat: int, grade: Grade | None, src: dict) -> dict:
    """A grade record (or, without `grade`, the key and source that such a record would have)."""
    rec = {"id": item["id"], "repeat": repeat}
    rec |= {
        "prompt_sha256": sha256(item["prompt"]),
        "completion_sha256": sha256(item["completion"]),
    }
    rec |= src
    if grade is not None:
        rec |= {k: getattr(grade, k) for k in (*SCORES, "age_group", "assessment")}
    return rec


def _done(out: Path, inputs: Path, items: list[dict], src: dict) -> set[tuple]:
    """Keys already graded in `out`; refuses a file with grades of another source or item."""
    if not out.exists():
        return set()
    known = {(it["id"], sha256(it["prompt"]), sha256(it["completion"])) for it in items}
    done = set()
    for where, r in read_records(out):
        if source(r) != src:
            raise UserError(
                f"{out} holds grades of {describe(source(r))}, this run grades "
                f"{describe(src)}: grade into a new --out, or pass --overwrite to replace it"
            )
        if (r.get("id"), r.get("prompt_sha256"), r.get("completion_sha256")) not in known:
            raise UserError(
                f"{where}: a grade of story {r.get('id')!r} for a beginning or completion that "
                f"{inputs} does not hold (regenerated completions?): grade into a new --out, "
                "or pass --overwrite to replace it"
            )
        check_grade(where, r)
        done.add(grade_key(r))
    return done


def _paths(inputs_jsonl, out_jsonl, overwrite: bool) -> tuple[Path, Path, Path]:
    """(inputs, grades file, file written now: the grades file, or its side file to overwrite)."""
    inputs, out = Path(inputs_jsonl), Path(out_jsonl)
    if out.exists() and not out.is_file():
        raise UserError(f"--out {out} is not a file")
    if out.resolve() == inputs.resolve():
        raise UserError(f"--out {out} is the inputs file; write grades to another file")
    return inputs, out, out.with_name(out.name + ".overwrite") if overwrite else out


def _resume(target: Path, inputs: Path, items: list[dict], src: dict, overwrite: bool) -> set:
    """Keys already graded in the file written now; an overwrite's side file left by a stopped
    run is resumed when it matches, and discarded (it is scratch) otherwise."""
    try:
        return _done(target, inputs, items, src)
    except UserError:
        if not overwrite:
            raise
        target.unlink()
        return set()


def _grade_all(
    store: JsonlStore, client: LLMClient, todo: list[tuple[dict, int]], src: dict,
    o: GradeOptions, bar: tqdm,
) -> tuple[Counter[str], list[str | int]]:  # fmt: skip
    """Grade (item, repeat) pairs `o.concurrency` at a time, appending each grade as it lands;
    returns (failures by kind, failed ids). An auth or request error stops the run."""
    failures: Counter[str] = Counter()
    failed_ids: list[str | int] = []
    pending = iter(todo)
    in_flight: dict[Future, tuple[dict, int]] = {}  # -> (item, repeat)
    with ThreadPoolExecutor(o.concurrency) as pool:
        try:
            while True:
                while len(in_flight) < o.concurrency and (job := next(pending, None)) is not None:
                    it = job[0]
                    fut: Future = pool.submit(
                        grade_one, client, it["prompt"], it["completion"],
                        max_retries_malformed=o.max_retries_malformed,
                        temperature=o.temperature, max_tokens=o.max_tokens,
                    )  # fmt: skip
                    in_flight[fut] = job
                if not in_flight:
                    return failures, failed_ids
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in finished:
                    item, repeat = in_flight.pop(fut)
                    try:
                        store.append([_record(item, repeat, fut.result(), src)])
                    except (AuthError, RequestError):
                        raise
                    except (MalformedGrade, LLMError) as e:
                        failures[type(e).__name__] += 1
                        failed_ids.append(item["id"])
                    bar.update(1)
        except (AuthError, RequestError) as e:
            for fut in in_flight:
                fut.cancel()
            raise UserError(f"{client.provider}: {e}") from None


def judge_file(
    inputs_jsonl: str | Path,
    out_jsonl: str | Path,
    client: LLMClient,
    options: GradeOptions | None = None,
) -> dict:
    """Grade every (input, repeat) whose key is not yet in `out_jsonl` (see the module docstring).

    Returns a JSON-ready summary of the grades file: this run's counts and failures, per-score
    means with bootstrap 95% intervals over stories, and with repeats the judge's agreement with
    itself.
    """
    o = options or GradeOptions()
    inputs, out, target = _paths(inputs_jsonl, out_jsonl, o.overwrite)
    check_writable(out.resolve(), directory=False)  # read-only, full: one line before any call
    with Lock(out.resolve()):  # held from reading what is done to the last grade
        return _judge_locked(inputs, out, target, client, o)


def _judge_locked(inputs: Path, out: Path, target: Path, client: LLMClient, o: GradeOptions):
    all_items = read_inputs(inputs)
    items = all_items[: o.limit]
    src = {"checkpoint": all_items[0].get("checkpoint"), "judge_model": client.model}
    src |= {"prompt_version": PROMPT_VERSION, "temperature": float(o.temperature)}
    done = _resume(target, inputs, all_items, src, o.overwrite)
    jobs = [(it, r) for it in items for r in range(o.repeat)]
    todo = [j for j in jobs if grade_key(_record(*j, None, src)) not in done]
    t0 = time.perf_counter()
    with (
        JsonlStore(target, lock=False) as store,
        tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="judge", unit="grade") as bar,
    ):
        failures, failed_ids = _grade_all(store, client, todo, src, o, bar)
    if o.overwrite:
        os.replace(target, out)
    return _summary(out, inputs, len(items), len(todo), failures, failed_ids, src, o) | {
        "seconds": round(time.perf_counter() - t0, 2), "llm": dict(client.stats)
    }  # fmt: skip


def _summary(out, inputs, n_items, n_todo, failures, failed_ids, src, o) -> dict:
    graded = load_grades(out, allow_empty=True)
    summary = {"out": str(out), "inputs": str(inputs), "items": n_items, "repeat": o.repeat}
    summary |= {"graded_total": len(graded), "graded_this_run": n_todo - sum(failures.values())}
    summary |= {"failures": dict(failures), "failed_ids": failed_ids[:20], "source": src}
    summary["scores"] = summarize(graded) if graded else None
    pairs = pairs_within(graded)
    summary["agreement"] = figures(pairs) if pairs else None
    if o.repeat > 1 and o.temperature == 0:
        summary["warning"] = "repeats at temperature 0 measure only the judge's nondeterminism"
    return summary
