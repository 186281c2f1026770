#!/usr/bin/env python
"""Grade story completions TinyStories-style with an LLM judge (Gemini or OpenAI-compatible).

  python scripts/judge.py complete --checkpoint runs/cpt --stories native_test.jsonl --n 200 \
      --out inputs.jsonl
  GEMINI_API_KEY=... python scripts/judge.py grade --inputs inputs.jsonl --out grades.jsonl \
      --provider gemini --model gemini-2.5-flash --concurrency 8
  python scripts/judge.py compare grades_before.jsonl grades_after.jsonl

Rerunning `grade` continues where it stopped; see `jaxlm.judge`.
"""

import sys

from jaxlm.judge import main

if __name__ == "__main__":
    sys.exit(main())
