"""`jaxlm synthesize`: step 3a of the method, native stories from an LLM, thin over jaxlm.synth."""

from __future__ import annotations

import argparse
import json

from jaxlm.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `synthesize`."""
    p = sub.add_parser("synthesize", help="generate native Arabic stories with an LLM (resumable)")
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--out", required=True)
    p.add_argument("--provider", choices=["gemini", "openai"], default="gemini")
    p.add_argument("--model", default="gemini-2.5-flash")
    p.add_argument("--base-url", default=None)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--min-words", type=int, default=60)
    p.add_argument("--max-words", type=int, default=800)
    p.add_argument("--min-arabic", type=float, default=0.95)
    p.add_argument("--near-dup", type=float, default=0.7)
    p.add_argument(
        "--max-attempts", type=int, default=6, help="LLM calls per story on 429/5xx/timeouts"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per LLM call")
    p.add_argument("--base-delay", type=float, default=1.0, help="first backoff, seconds")
    p.add_argument("--overwrite", action="store_true",
                   help="start --out afresh (it was made with other settings)")  # fmt: skip
    p.set_defaults(func=cmd_synthesize)


def cmd_synthesize(a) -> int:
    from jaxlm.llm import LLMError, RetryPolicy, make_client
    from jaxlm.synth.run import SynthConfig, run
    from jaxlm.synth.validate import StoryChecks

    cfg = SynthConfig(
        n=a.n, out=a.out, provider=a.provider, model=a.model, base_url=a.base_url,
        concurrency=a.concurrency, seed=a.seed, temperature=a.temperature, max_tokens=a.max_tokens,
        checks=StoryChecks(min_words=a.min_words, max_words=a.max_words, min_arabic=a.min_arabic),
        near_dup=a.near_dup, overwrite=a.overwrite,
    )  # fmt: skip
    retry = RetryPolicy(max_attempts=a.max_attempts, timeout=a.timeout, base_delay=a.base_delay)
    try:
        client = make_client(cfg.provider, cfg.model, cfg.base_url, retry=retry)
        stats = run(cfg, client)
    except LLMError as e:
        raise UserError(str(e)) from None
    print(json.dumps(stats, ensure_ascii=False))
    return 0
