#!/usr/bin/env python
"""Translate stories with an NLLB / M2M100 model, sharded and resumable; `merge` joins shards.

  python scripts/translate.py --input stories.txt --out ar.jsonl --shard 0/4 [--backend ctranslate2]
  python scripts/translate.py merge --out ar.jsonl --input stories.txt ar.shard-*-of-4.jsonl

See `jaxlm.mt.translate` for the output files and the resume and rejection rules.
"""

import sys

from jaxlm.mt.translate import main

if __name__ == "__main__":
    sys.exit(main())
