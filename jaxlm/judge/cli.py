"""`jaxlm judge complete | grade | compare | agreement`: step 4 of the method, thin over
jaxlm.judge; every command prints one JSON object (strict JSON: no NaN).

`compare` pairs every file after the first against the first (B - A), so a base model can be
compared with several continued ones in one call; given one file, it prints that file's summary.
"""

from __future__ import annotations

import argparse
import json

from jaxlm.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `judge` with `complete`, `grade`, `compare` and `agreement`."""
    judge = sub.add_parser("judge", help="TinyStories-style grading of completions by an LLM")
    jsub = judge.add_subparsers(dest="judge_command", required=True)
    c = jsub.add_parser("complete", help="complete story beginnings with a jaxlm checkpoint")
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
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --out made with other settings (grades made from it go stale)",
    )
    c.set_defaults(func=cmd_complete)

    g = jsub.add_parser("grade", help="grade completions with an LLM judge")
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
    g.add_argument("--repeat", type=int, default=1, help="grade each item K times (agreement)")
    g.add_argument(
        "--overwrite", action="store_true", help="regrade and replace --out (atomically)"
    )
    g.set_defaults(func=cmd_grade)

    m = jsub.add_parser("compare", help="paired comparison: each file against the first (B - A)")
    m.add_argument("grades", nargs="+", help="grades files: A, then B (and more, each vs A)")
    _bootstrap_args(m)
    m.set_defaults(func=cmd_compare)

    r = jsub.add_parser("agreement", help="how far the judge agrees with itself or another")
    r.add_argument("grades", nargs="+", help="one file graded with --repeat >= 2, or two files")
    _bootstrap_args(r)
    r.set_defaults(func=cmd_agreement)


def _bootstrap_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (>= 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def _print(result: dict) -> int:
    print(json.dumps(result, ensure_ascii=False, allow_nan=False))
    return 0


def cmd_complete(a) -> int:
    from jaxlm.judge.complete import make_judge_inputs

    return _print(make_judge_inputs(
        a.checkpoint, a.stories, a.out, n=a.n, fraction=a.fraction, min_words=a.min_words,
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
        seed=a.seed, batch_size=a.batch_size, field=a.field, tokenizer=a.tokenizer,
        overwrite=a.overwrite,
    ))  # fmt: skip


def cmd_grade(a) -> int:
    from jaxlm.judge.grade import GradeOptions, judge_file
    from jaxlm.llm import LLMError, RetryPolicy, make_client

    options = GradeOptions(
        concurrency=a.concurrency, repeat=a.repeat, limit=a.limit, overwrite=a.overwrite,
        max_retries_malformed=a.max_retries_malformed, temperature=a.temperature,
        max_tokens=a.max_tokens,
    )  # fmt: skip
    retry = RetryPolicy(max_attempts=a.max_attempts, timeout=a.timeout, base_delay=a.base_delay)
    try:
        client = make_client(a.provider, a.model, a.base_url, retry=retry)
        return _print(judge_file(a.inputs, a.out, client, options))
    except LLMError as e:
        raise UserError(str(e)) from None


def cmd_compare(a) -> int:
    from jaxlm.judge.stats import compare

    return _print(compare(a.grades, resamples=a.resamples, seed=a.seed))


def cmd_agreement(a) -> int:
    from jaxlm.judge.agreement import agreement

    return _print(agreement(a.grades, resamples=a.resamples, seed=a.seed))
