#!/usr/bin/env python
"""Generate synthetic native Arabic stories with an LLM (Gemini or any OpenAI-compatible API).

  GEMINI_API_KEY=... python scripts/synthesize.py --n 20000 --out stories.jsonl --provider gemini \
      --model gemini-2.5-flash --concurrency 16
  OPENAI_API_KEY=... python scripts/synthesize.py --n 20000 --out stories.jsonl --provider openai \
      --model command-r-plus --base-url https://api.cohere.ai/compatibility/v1

Rerunning the same command continues where it stopped; see `jaxlm.synth.run`.
"""

import sys

from jaxlm.synth.run import main

if __name__ == "__main__":
    sys.exit(main())
