"""Step 4 of the method: grade story completions with an LLM, as TinyStories (Eldan & Li 2023) does.

A model is given the beginning of a story and completes it (`make_judge_inputs`); a strong LLM
(Gemini, or any OpenAI-compatible endpoint through `jaxlm.llm`) then grades the completion as a
teacher grades a student (`judge_file`): a short free-text assessment, then scores out of 10 for
grammar, creativity and consistency with the beginning, and a guess of the writer's age group
(A: 3 or under, B: 4-5, C: 6-7, D: 8-9, E: 10-12, F: 13-16).

The grading prompt is in English, with the Arabic story quoted verbatim: judge models follow
English instructions most reliably, and an English assessment can be read by everyone on the
project. It asks the judge to grade *Arabic* (Modern Standard Arabic grammar, agreement of gender
and number), shows the beginning and the completion separated by `***` (TinyStories' marker, so a
sentence cut in the middle stays visible), and asks for one final JSON line
`{"grammar": g, "creativity": c, "consistency": k, "age_group": "C"}`. TinyStories used two
turns (assessment, then grades); one turn with a machine-readable last line costs half the calls.

`parse_grade` reads that JSON line, or failing that "Grammar: 8/10"-style lines (English or
Arabic labels, Western or Arabic-Indic digits); anything else raises `MalformedGrade`, and the
judge is re-asked (with a reminder, at temperature >= 0.7) up to `max_retries_malformed` times.

Outputs are append-only JSON Lines through `jaxlm.mt.store` (a rerun skips graded ids and cuts a
torn last line). Items that fail for good are counted in the summary and not written, so a rerun
tries them again. The API key lives only inside the client, which redacts it from every error.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from jaxlm.data.readers import json_lines
from jaxlm.errors import UserError
from jaxlm.llm import AuthError, LLMClient, LLMError, RequestError, RetryPolicy, make_client
from jaxlm.mt.store import JsonlStore, read_jsonl, write_jsonl_atomic

SCORES = ("grammar", "creativity", "consistency")
AGE_GROUPS = {"A": "3 or under", "B": "4-5", "C": "6-7", "D": "8-9", "E": "10-12", "F": "13-16"}
SEPARATOR = "***"

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
and consistency with the story's beginning. Also give your best guess of the student's age, as \
reflected by the completion, as one letter: A: 3 or under. B: 4-5. C: 6-7. D: 8-9. E: 10-12. \
F: 13-16.

End your answer with exactly one line of JSON and nothing after it, for example:
{{"grammar": 7, "creativity": 5, "consistency": 8, "age_group": "C"}}"""

REMINDER = """

Your previous answer could not be read. Remember to end with one line of JSON with integer \
scores from 1 to 10 and an age group letter from A to F, for example:
{"grammar": 7, "creativity": 5, "consistency": 8, "age_group": "C"}"""


class MalformedGrade(ValueError):
    """A judge answer without readable scores (re-asked, then counted as a failure)."""


@dataclass(frozen=True)
class Grade:
    """One parsed judgement."""

    grammar: int
    creativity: int
    consistency: int
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


def read_inputs(path: str | Path) -> list[dict]:
    """Judge inputs (`id`, `prompt`, `completion`); `UserError` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such inputs file")
    items, seen = [], set()
    for where, obj in json_lines(path):  # a byte order mark is dropped
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
        if obj["id"] in seen:
            raise UserError(f"{where}: duplicate id {obj['id']!r}")
        seen.add(obj["id"])
        items.append(obj)
    if not items:
        raise UserError(f"{path}: no inputs")
    return items


def _stats(values: list[float]) -> dict:
    n = len(values)
    if not n:
        return {"n": 0, "mean": None, "std": None}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"n": n, "mean": round(mean, 3), "std": round(std, 3)}


def summarize(records: list[dict]) -> dict:
    """Mean and sample std of each score, and counts of age groups, over graded records."""
    out = {"n": len(records)}
    out |= {k: _stats([float(r[k]) for r in records]) for k in SCORES}
    out["age_groups"] = dict(sorted(Counter(r["age_group"] for r in records).items()))
    return out


def _record(item: dict, grade: Grade, model: str) -> dict:
    return {
        "id": item["id"], "grammar": grade.grammar, "creativity": grade.creativity,
        "consistency": grade.consistency, "age_group": grade.age_group,
        "assessment": grade.assessment, "judge_model": model,
    }  # fmt: skip


def judge_file(
    inputs_jsonl: str | Path,
    out_jsonl: str | Path,
    client: LLMClient,
    *,
    concurrency: int = 8,
    max_retries_malformed: int = 2,
    temperature: float = 0.0,
    max_tokens: int = 1024,
    limit: int | None = None,
) -> dict:
    """Grade every input not yet in `out_jsonl` (the first `limit` inputs when given).

    Returns the summary over all graded records in `out_jsonl`, with this run's failures.
    """
    if concurrency < 1:
        raise UserError(f"concurrency={concurrency} must be >= 1")
    items = read_inputs(inputs_jsonl)[:limit]
    out = Path(out_jsonl)
    done = {r["id"] for r in read_jsonl(out)}
    todo = [it for it in items if it["id"] not in done]
    t0, failures, failed_ids = time.perf_counter(), Counter(), []
    kw = {"max_retries_malformed": max_retries_malformed, "temperature": temperature}
    kw["max_tokens"] = max_tokens
    with (
        JsonlStore(out) as store,
        ThreadPoolExecutor(concurrency) as pool,
        tqdm(total=len(items), initial=len(items) - len(todo), desc="judge", unit="story") as bar,
    ):
        pending = iter(todo)
        in_flight: dict[Future, dict] = {}
        try:
            while True:
                while len(in_flight) < concurrency and (it := next(pending, None)) is not None:
                    fut = pool.submit(grade_one, client, it["prompt"], it["completion"], **kw)
                    in_flight[fut] = it
                if not in_flight:
                    break
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in finished:
                    item = in_flight.pop(fut)
                    try:
                        store.append([_record(item, fut.result(), client.model)])
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
    graded = list(read_jsonl(out))
    summary = {"out": str(out), "inputs": len(items), "graded_total": len(graded)}
    summary |= {"graded_this_run": len(todo) - sum(failures.values())}
    summary |= {"failures": dict(failures), "failed_ids": failed_ids[:20]}
    summary |= {"judge_model": client.model, "scores": summarize(graded)}
    summary |= {"seconds": round(time.perf_counter() - t0, 2), "llm": dict(client.stats)}
    return summary


def compare(paths: list[str | Path]) -> dict:
    """Mean scores of several grades files side by side (e.g. before vs after CPT)."""
    table = {"files": [str(p) for p in paths]}
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"{p}: no such grades file")
    sums = [summarize(list(read_jsonl(p))) for p in paths]
    for p, s in zip(paths, sums, strict=True):
        if not s["n"]:
            raise UserError(f"{p}: no graded records")
    table["n"] = [s["n"] for s in sums]
    for k in SCORES:
        table[k] = [s[k]["mean"] for s in sums]
    if len(paths) >= 2:
        table["delta_last_minus_first"] = {k: round(table[k][-1] - table[k][0], 3) for k in SCORES}
    table["age_groups"] = [s["age_groups"] for s in sums]
    return table


# ---------------------------------------------------------------------------- completions


def cut_story(text: str, fraction: float = 0.4) -> tuple[str, str]:
    """(beginning, rest): the story cut after the word nearest `fraction` of its words.

    At least one word stays on each side; the original spacing and newlines are kept.
    """
    words = list(re.finditer(r"\S+", text))
    if len(words) < 2:
        raise ValueError("a story needs at least two words to be cut")
    k = min(len(words) - 1, max(1, round(len(words) * fraction)))
    end = words[k - 1].end()
    return text[:end], text[end:].strip()


def _stories(path: str, field: str) -> Iterator[str]:
    from jaxlm.data.readers import ReadOptions, read

    return read(path, options=ReadOptions(field=field))


def make_judge_inputs(
    checkpoint: str | Path,
    stories: str | Path,
    out_jsonl: str | Path,
    *,
    n: int = 50,
    fraction: float = 0.4,
    min_words: int = 10,
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    batch_size: int = 16,
    field: str = "text",
    tokenizer: str | None = None,
) -> dict:
    """Complete the beginnings of the first `n` stories (>= `min_words` words) with a checkpoint.

    Writes `out_jsonl` (`id`, `prompt`, `completion`, `reference`: the story's true rest,
    `checkpoint`) atomically; returns a small summary.
    """
    from jaxlm.checkpoint import load_model
    from jaxlm.generate import SamplingConfig, generate
    from jaxlm.tokenizer import Tokenizer

    if not 0 < fraction < 1:
        raise UserError(f"fraction={fraction} must be in (0, 1)")
    model, info = load_model(checkpoint)
    if not (tokenizer or info.tokenizer):
        raise UserError(f"{checkpoint}: no tokenizer recorded; pass --tokenizer")
    tok = Tokenizer.load(tokenizer or info.tokenizer)
    budget = model.cfg.max_positions - max_new_tokens
    items, skipped = [], Counter()
    for i, story in enumerate(_stories(str(stories), field)):
        if len(items) >= n:
            break
        if len(story.split()) < max(2, min_words):
            skipped["too_short"] += 1
            continue
        beginning, rest = cut_story(story, fraction)
        ids = [tok.eos_id] + tok.encode(beginning)  # a story starts right after an EOS
        if len(ids) > budget:
            skipped["too_long"] += 1
            continue
        items.append({"id": f"story-{i:06d}", "prompt": beginning, "reference": rest, "ids": ids})
    if not items:
        raise UserError(f"{stories}: no story with at least {min_words} words")
    sampling = SamplingConfig(temperature=temperature, top_k=top_k)
    for b in tqdm(range(0, len(items), batch_size), desc="complete", unit="batch"):
        batch = items[b : b + batch_size]
        new = generate(
            model, [it["ids"] for it in batch], max_new_tokens=max_new_tokens,
            sampling=sampling, seed=seed + b, eos_id=tok.eos_id, pad_id=tok.pad_id,
        )  # fmt: skip
        for it, toks in zip(batch, new, strict=True):
            it["completion"] = tok.decode([t for t in toks if t != tok.eos_id]).strip()
    records = [
        {"id": it["id"], "prompt": it["prompt"], "completion": it["completion"],
         "reference": it["reference"], "checkpoint": str(checkpoint)}
        for it in items
    ]  # fmt: skip
    write_jsonl_atomic(out_jsonl, records)
    return {"out": str(out_jsonl), "written": len(records), "skipped": dict(skipped)}


# ---------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="judge.py", description="TinyStories-style LLM grading.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("complete", help="complete story beginnings with a jaxlm checkpoint")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--stories", required=True, help="JSON Lines (--field) or text stories")
    c.add_argument("--n", type=int, default=50)
    c.add_argument("--out", required=True)
    c.add_argument("--field", default="text")
    c.add_argument("--tokenizer", default=None, help="default: the checkpoint's tokenizer")
    c.add_argument("--fraction", type=float, default=0.4, help="share of words kept as prompt")
    c.add_argument("--min-words", type=int, default=10)
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.8)
    c.add_argument("--top-k", type=int, default=50)
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("grade", help="grade completions with an LLM judge")
    g.add_argument("--inputs", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--provider", choices=["gemini", "openai"], default="gemini")
    g.add_argument("--model", default="gemini-2.5-flash")
    g.add_argument("--base-url", default=None)
    g.add_argument("--concurrency", type=int, default=8)
    g.add_argument("--limit", type=int, default=None, help="grade only the first N inputs")
    g.add_argument("--max-retries-malformed", type=int, default=2)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--max-tokens", type=int, default=1024)
    g.add_argument("--max-attempts", type=int, default=6, help="calls on 429/5xx/timeouts")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per LLM call")
    g.add_argument("--base-delay", type=float, default=1.0, help="first backoff, seconds")
    m = sub.add_parser("compare", help="mean scores of grades files side by side")
    m.add_argument("grades", nargs="+")
    return p


def _run(a: argparse.Namespace) -> dict:
    if a.cmd == "complete":
        return make_judge_inputs(
            a.checkpoint, a.stories, a.out, n=a.n, fraction=a.fraction, min_words=a.min_words,
            max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
            seed=a.seed, batch_size=a.batch_size, field=a.field, tokenizer=a.tokenizer,
        )  # fmt: skip
    if a.cmd == "grade":
        retry = RetryPolicy(max_attempts=a.max_attempts, timeout=a.timeout, base_delay=a.base_delay)
        client = make_client(a.provider, a.model, a.base_url, retry=retry)
        return judge_file(
            a.inputs, a.out, client, concurrency=a.concurrency, limit=a.limit,
            max_retries_malformed=a.max_retries_malformed, temperature=a.temperature,
            max_tokens=a.max_tokens,
        )  # fmt: skip
    return compare(a.grades)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        result = _run(a)
    except (UserError, LLMError) as e:
        print(f"judge.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, ensure_ascii=False))
    return 0
