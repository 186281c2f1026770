"""`jaxlm translate` and `jaxlm translate-merge`: step 1 of the method, thin over jaxlm.mt."""

from __future__ import annotations

import argparse
import json

from jaxlm.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `translate` (one worker, resumable) and `translate-merge` (join the shards)."""
    from jaxlm.mt.filters import REASONS

    p = sub.add_parser("translate", help="translate stories with NLLB / M2M100 (resumable)")
    p.add_argument("--input", nargs="+", required=True, help=".txt or .jsonl files")
    p.add_argument("--out", required=True, help="output .jsonl (append-only, resumable)")
    p.add_argument("--model", default="facebook/nllb-200-3.3B")
    p.add_argument("--src", default="eng_Latn")
    p.add_argument("--tgt", default="arb_Arab")
    p.add_argument("--backend", choices=["transformers", "ctranslate2"], default="transformers")
    p.add_argument("--shard", default="", help="i/N: translate the i-th of N disjoint parts")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"]
    )
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-stories", type=int, default=256)
    p.add_argument("--max-input-tokens", type=int, default=256)
    p.add_argument("--len-ratio", type=float, default=2.0)
    p.add_argument("--len-extra", type=int, default=10)
    p.add_argument("--filters", default=",".join(REASONS), help="comma list, or 'none'")
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    p.add_argument("--no-fix-text", action="store_true", help="do not repair mojibake (ftfy)")
    p.add_argument("--retry-rejected", action="store_true")
    p.add_argument("--ct2-cache", default="")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="start the output afresh (it was made with other settings)")  # fmt: skip
    p.set_defaults(func=cmd_translate)

    m = sub.add_parser("translate-merge", help="join translation shards; check every id once")
    m.add_argument("parts", nargs="+")
    m.add_argument("--out", required=True)
    m.add_argument(
        "--input",
        action="append",
        help="an input file (repeatable): check every id is accounted for",
    )
    m.add_argument("--text-field", default="text")
    m.add_argument("--id-field", default="id")
    m.add_argument("--overwrite", action="store_true", help="replace an --out made otherwise")
    m.set_defaults(func=cmd_merge)


def config_from_args(a: argparse.Namespace):
    """The TranslateConfig that the flags describe."""
    from jaxlm.mt.backends import BackendConfig
    from jaxlm.mt.filters import FilterConfig
    from jaxlm.mt.translate import TranslateConfig

    filters = () if a.filters == "none" else tuple(f for f in a.filters.split(",") if f)
    try:
        fcfg = FilterConfig(enabled=filters)
    except ValueError as e:
        raise UserError(f"--filters: {e}") from e
    bcfg = BackendConfig(
        model=a.model, src=a.src, tgt=a.tgt, kind=a.backend, device=a.device, dtype=a.dtype,
        beam=a.beam, max_input_tokens=a.max_input_tokens, len_ratio=a.len_ratio,
        len_extra=a.len_extra, ct2_cache=a.ct2_cache,
    )  # fmt: skip
    return TranslateConfig(
        inputs=tuple(a.input), out=a.out, backend=bcfg, filters=fcfg, shard=a.shard,
        batch_size=a.batch_size, chunk_stories=a.chunk_stories, text_field=a.text_field,
        id_field=a.id_field, fix_text=not a.no_fix_text, retry_rejected=a.retry_rejected,
        limit=a.limit, overwrite=a.overwrite,
    )  # fmt: skip


def cmd_translate(args) -> int:
    from jaxlm.mt.translate import run

    print(json.dumps(run(config_from_args(args)), ensure_ascii=False))
    return 0


def cmd_merge(args) -> int:
    from jaxlm.mt.translate import merge

    stats = merge(args.parts, args.out, args.input, overwrite=args.overwrite,
                  text_field=args.text_field, id_field=args.id_field)  # fmt: skip
    print(json.dumps(stats, ensure_ascii=False))
    return 0
